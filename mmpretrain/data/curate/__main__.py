import sys

from mmpretrain.data.curate import main

sys.exit(main())
