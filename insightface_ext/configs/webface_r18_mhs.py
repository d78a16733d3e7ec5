"""CASIA-WebFace (10,572 ids, 490,623 images), IResNet-18, MHS-ArcFace {12; 881} as in the MHS paper."""

from insightface_ext.config import base_config

config = base_config()
config.network = "r18"
config.head_sizes = (12, 881)
config.fp16 = True
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.1
config.rec = "/train_tmp/faces_webface_112x112"
config.num_classes = 10572
config.num_image = 490623
config.num_epoch = 25
config.warmup_epoch = 2
config.val_targets = ("lfw", "cfp_fp", "agedb_30")
config.output = "work_dirs/webface_r18_mhs"
