# mmpretrain config: a width-16 CIFAR-style ResNet-18 with an MHP head on the bundled glyph subset
# (first 40 classes, 32x32 glyphs rendered from CJK fonts; valid/test are held-out fonts), one epoch on CPU.
# Runs as it is after `pip install -c constraints.txt -e ".[mm]"`: see docs/mm.md (Runner.from_cfg).
custom_imports = dict(imports=["mhe_plugins.mm"], allow_failed_imports=False)
default_scope = "mmpretrain"

num_classes = 40
model = dict(
    type="ImageClassifier",
    data_preprocessor=dict(
        type="ClsDataPreprocessor", num_classes=num_classes, mean=[127.5] * 3, std=[127.5] * 3, to_rgb=False
    ),
    backbone=dict(
        type="ResNet_CIFAR",
        depth=18,
        stem_channels=16,
        base_channels=16,
        num_stages=4,
        out_indices=(3,),
        style="pytorch",
    ),
    neck=dict(type="GlobalAveragePooling"),
    head=dict(
        type="MHPClsHead",
        in_channels=128,  # base_channels * 8
        num_classes=num_classes,
        head_sizes=[5, 8],  # 5 x 8 = 40: one Linear(128, 13) instead of Linear(128, 40)
        loss=dict(type="CrossEntropyLoss", loss_weight=1.0),
        topk=(1, 5),
    ),
)

# GlyphClsDataset (mhe_plugins.mm): data_root=None is the bundled subset; images are in memory, so the
# pipeline has no LoadImageFromFile (mmpretrain's inferencer loads files itself).
train_pipeline = [dict(type="PackInputs")]
test_pipeline = [dict(type="PackInputs")]
train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    dataset=dict(type="GlyphClsDataset", split="train", num_classes=num_classes, pipeline=train_pipeline),
    sampler=dict(type="DefaultSampler", shuffle=True),
)
val_dataloader = dict(
    batch_size=64,
    num_workers=0,
    dataset=dict(type="GlyphClsDataset", split="valid", num_classes=num_classes, pipeline=test_pipeline),
    sampler=dict(type="DefaultSampler", shuffle=False),
)
val_evaluator = dict(type="Accuracy", topk=(1, 5))
test_dataloader = dict(
    batch_size=64,
    num_workers=0,
    dataset=dict(type="GlyphClsDataset", split="test", num_classes=num_classes, pipeline=test_pipeline),
    sampler=dict(type="DefaultSampler", shuffle=False),
)
test_evaluator = val_evaluator

max_epochs = 1  # 816 training images / 32 = 26 iterations
optim_wrapper = dict(optimizer=dict(type="AdamW", lr=1e-2, weight_decay=0.05))
param_scheduler = dict(type="CosineAnnealingLR", by_epoch=True, T_max=max_epochs, convert_to_iter_based=True)
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
val_cfg = dict()
test_cfg = dict()

default_hooks = dict(
    logger=dict(type="LoggerHook", interval=10),
    checkpoint=dict(type="CheckpointHook", interval=1),
)
randomness = dict(seed=0)
work_dir = "runs/mm/glyphs_resnet18_mhp"
