import sys

from gpufleet.testbed.bed import main

sys.exit(main())
