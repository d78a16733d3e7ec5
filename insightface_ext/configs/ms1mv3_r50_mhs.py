"""MS1MV3 (93,431 ids, 5,179,510 images), IResNet-50, MHS-ArcFace {13; 7187} (the reference's r100 split)."""

from insightface_ext.config import base_config

config = base_config()
config.network = "r50"
config.embedding_size = 512
config.margin_list = (1.0, 0.5, 0.0)
config.head_sizes = (13, 7187)
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128
config.lr = 0.1
config.rec = "/train_tmp/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = ("lfw", "cfp_fp", "agedb_30")
config.output = "work_dirs/ms1mv3_r50_mhs"
