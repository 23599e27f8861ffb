"""``python -m nomad_client``: the same command line as ``nomad-client``."""

import sys

from nomad_client.cli.main import main

sys.exit(main())
