import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the command line is still being imported: no traceback
    print("\ninterrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
