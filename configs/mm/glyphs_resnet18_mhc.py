# The MHP config with an MHC head: group head over 5 groups, then the 8 children of each (beam 5 = exact).
_base_ = ["./glyphs_resnet18_mhp.py"]

model = dict(
    head=dict(
        _delete_=True,
        type="MHCClsHead",
        in_channels=128,
        num_classes=40,
        head_sizes=[5, 8],
        hidden_dim=64,
        beam=5,
        loss=dict(type="CrossEntropyLoss", loss_weight=1.0),
        topk=(1, 5),
    )
)
work_dir = "runs/mm/glyphs_resnet18_mhc"
