"""One module per command: ``configure(parser)`` adds its arguments, ``main(args)`` runs it."""
