"""`python -m labelproxy` entry point."""

from labelproxy.cli import main

raise SystemExit(main())
