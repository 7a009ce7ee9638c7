"""``python -m safer_diffusion`` = the ``safer-diffusion`` command."""

from safer_diffusion.cli import main

raise SystemExit(main())
