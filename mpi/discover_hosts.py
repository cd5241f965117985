#!/usr/bin/env python3
"""Kept so existing launch lines keep working: the discovery code is ``hvdkit.discover_hosts``.

    horovodrun ... --host-discovery-script "python mpi/discover_hosts.py /etc/hvd/hosts"
    # same as: python -m hvdkit.discover_hosts /etc/hvd/hosts   (works for any install)
"""
import os
import sys

try:
    from hvdkit.discover_hosts import main
except ImportError:  # hvdkit not installed for this python: use the checkout this file sits in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from hvdkit.discover_hosts import main

if __name__ == "__main__":
    sys.exit(main(sys.argv))
