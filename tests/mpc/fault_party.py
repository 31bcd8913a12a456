"""One party's ``aloe mpc party`` command with a fault: the process kills itself (SIGKILL, nothing closed or flushed)
when its training loop reaches step STEP of epoch EPOCH (counted from 0).

Usage: python fault_party.py EPOCH STEP mpc party --role ROLE --config FILE ...
"""

from __future__ import annotations

import dataclasses
import sys

from aloe.cli import main
from aloe.mpc import deploy


def with_fault(epoch: int, step: int) -> None:
    plain = deploy.train_config

    def train_config(dep, role, **extra):
        return dataclasses.replace(plain(dep, role, **extra), fail_at=(role, epoch, step))

    deploy.train_config = train_config


if __name__ == "__main__":
    with_fault(int(sys.argv[1]), int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
