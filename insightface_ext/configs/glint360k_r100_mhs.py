"""Glint360K (360,232 ids, 17,091,657 images), IResNet-100, MHS-ArcFace {600; 601}."""

from insightface_ext.config import base_config

config = base_config()
config.network = "r100"
config.head_sizes = (600, 601)
config.fp16 = True
config.weight_decay = 1e-4
config.batch_size = 128
config.lr = 0.1
config.rec = "/train_tmp/glint360k"
config.num_classes = 360232
config.num_image = 17091657
config.num_epoch = 20
config.val_targets = ("lfw", "cfp_fp", "agedb_30")
config.output = "work_dirs/glint360k_r100_mhs"
