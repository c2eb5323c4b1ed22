import sys

from mmpretrain.train import main

sys.exit(main())
