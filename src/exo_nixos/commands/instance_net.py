"""``exo-nixos instance-net up|down|host``: the network of the nodes of a node per GPU.

``up --instance gpu0`` makes the network namespace ``exo-gpu0`` with a macvlan (bridge mode)
on the cluster interface; ``down`` removes it; ``host`` gives the host its own macvlan
(``exo-host``) to reach its nodes. ExecStart/ExecStop of ``exo-netns@.service`` and
``exo-host-link.service``; needs CAP_NET_ADMIN and CAP_SYS_ADMIN.
"""

from __future__ import annotations

import argparse

from exo_nixos.commands.rootarg import add_config_argument


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("up", "down", "host"))
    add_config_argument(parser)
    parser.add_argument("--instance", metavar="NAME", help="the node, e.g. gpu0 (up, down)")


def main(args: argparse.Namespace) -> int:
    from exo_nixos.config import load_config
    from exo_nixos.errors import UserError
    from exo_nixos.hardware.instances import instance_for, instances
    from exo_nixos.network import instance_net

    config = load_config(args.config)
    parent = config.networking.bond_interface
    if parent is None or not config.hardware.node_per_gpu.enable:
        raise UserError(f"{args.config}: hardware.nodePerGpu is off; instance-net is for its nodes")
    machine_id = instance_net.read_machine_id()
    if args.action == "host":
        nodes = instances(config.hardware.node_per_gpu)
        addresses = [i.address for i in nodes if i.address is not None]
        instance_net.host_up(parent, addresses, machine_id=machine_id)
        print(f"{instance_net.HOST_LINK}: macvlan on {parent}")
        return 0
    if args.instance is None:
        raise UserError(f"instance-net {args.action} needs --instance NAME")
    instance = instance_for(config, args.instance)
    if args.action == "down":
        instance_net.instance_down(instance.name)
        return 0
    namespace = instance_net.instance_up(
        parent, instance.name, address=instance.address, machine_id=machine_id
    )
    print(f"{namespace}: macvlan {parent} on the host's {parent}")
    return 0
