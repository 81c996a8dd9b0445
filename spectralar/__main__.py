import sys

from spectralar.cli import main

sys.exit(main())
