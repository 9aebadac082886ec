"""A test double of upstream exo's node: its command line and the HTTP routes this project uses.

Run it with ``python -m tests.exo_double``; start it from tests with
``tests.exo_double.fixture.run_double``. docs/test-double.md lists routes, flags and faults.
"""
