"""`python -m token_journey.config [overrides...]` prints the composed config (params.yaml)."""

import sys

from token_journey.config import compose, dump_yaml

sys.stdout.write(dump_yaml(compose(sys.argv[1:])))
