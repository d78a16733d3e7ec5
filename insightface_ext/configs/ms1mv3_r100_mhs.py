"""MS1MV3, IResNet-100, MHS-ArcFace {13; 7187}."""

from insightface_ext.config import base_config

config = base_config()
config.network = "r100"
config.head_sizes = (13, 7187)
config.fp16 = True
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.1
config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 20
config.val_targets = ("lfw", "cfp_fp", "agedb_30")
config.output = "work_dirs/ms1mv3_r100_mhs"
