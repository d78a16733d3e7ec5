"""CPU-sized stand-in (NOT faces): the bundled 500 GB2312 glyph classes, 32x32 grey, a width-16 IResNet-18, MHS {25; 20}.

Trains on the bundled subset's train fonts and verifies on ``verify_test.bin``: 600 pairs of the same
characters rendered in the 3 held-out test fonts (unseen "photos" of seen identities; the open-set
benchmark on unseen characters is ``python -m insightface_ext.bench``).  Outputs go to ``./runs/``.
"""

from insightface_ext.config import base_config
from mhe_plugins.bundled import bundled_data

GLYPHS = bundled_data("glyphs")

config = base_config()
config.network = "r18"
config.width = 16
config.embedding_size = 128
config.input_size = 32
config.in_chans = 1
config.margin_list = (1.0, 0.3, 0.0)
config.scale = 32.0
config.head_sizes = (25, 20)
config.batch_size = 128
config.lr = 0.1
config.weight_decay = 5e-4
config.num_epoch = 2
config.warmup_epoch = 0
config.rec = f"glyphs:{GLYPHS}:train"
config.num_classes = 500
config.val_targets = (str(GLYPHS / "verify_test.bin"),)
config.output = "runs/glyphs_r18_mhs"
config.num_workers = 0
config.verbose = 10**9
config.log_every = 20
