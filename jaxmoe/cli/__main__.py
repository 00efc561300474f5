"""`python -m jaxmoe.cli` = the `jaxmoe` command."""
import sys

from jaxmoe.cli import main

sys.exit(main())
