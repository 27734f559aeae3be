"""``python -m layerdecode.cli``."""

from . import main

main()
