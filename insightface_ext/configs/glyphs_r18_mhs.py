"""CPU-sized stand-in (NOT faces): GB2312 level-1 glyphs, 32x32 grey, a width-16 IResNet-18, MHS {76; 50}."""

from insightface_ext.config import base_config

config = base_config()
config.network = "r18"
config.width = 16
config.embedding_size = 128
config.input_size = 32
config.in_chans = 1
config.margin_list = (1.0, 0.3, 0.0)
config.scale = 32.0
config.head_sizes = (76, 50)
config.batch_size = 128
config.lr = 0.1
config.weight_decay = 5e-4
config.num_epoch = 4
config.warmup_epoch = 1
config.rec = "glyphs:/work/data/glyphs_gb1:train"
config.num_classes = 3755
config.val_targets = ()
config.output = "work_dirs/glyphs_r18_mhs"
config.num_workers = 0
config.verbose = 10**9
config.log_every = 20
