"""The PyTorch twin of `minivgg.models.vgg`: the same Table 1 column in torch.nn.

Built from minivgg's own Table 1 data (`minivgg.models.CONFIGS`), with its channel rounding
and floor-mode pools, torchvision style (in-place ReLU), so a benchmark or a training twin
compares the engines on the same network. Used by `bench_step.py` and
`train_torch_twin.py`; the tests keep an independent twin of their own
(tests/support/torch_vgg.py), written from the paper, not from this data.
"""

from minivgg import models


def torch_vgg(torch, config, num_classes=1000, width=1.0, fc_width=4096, input_size=224,
              dropout=0.5, init="torch"):
    """Table 1's column `config` as a torch.nn.Sequential.

    LRN (Sec. 2.1, AlexNet's) takes alpha * 5, because torch divides alpha by the window
    size. `init`: "torch" leaves PyTorch's default initialisation; "glorot" draws
    Glorot-uniform weights and zero biases, as minivgg's `init_weights(model, "glorot")`.
    """
    nn = torch.nn
    layers, in_ch = [], 3
    for block in models.CONFIGS[models.canonical_config(config)]:
        for spec in block:
            kind, k, channels = models.parse_layer(spec)
            if kind == "lrn":  # NOTE: torch's alpha is divided by n, the paper's is not
                layers.append(nn.LocalResponseNorm(5, alpha=5 * 1e-4, beta=0.75, k=2.0))
                continue
            out_ch = max(1, int(round(channels * width)))
            layers += [nn.Conv2d(in_ch, out_ch, k, 1, k // 2), nn.ReLU(inplace=True)]
            in_ch = out_ch
        layers.append(nn.MaxPool2d(2, 2))
    side = models.pooled_size(input_size)
    layers += [nn.Flatten(), nn.Linear(in_ch * side * side, fc_width), nn.ReLU(inplace=True),
               nn.Dropout(dropout), nn.Linear(fc_width, fc_width), nn.ReLU(inplace=True),
               nn.Dropout(dropout), nn.Linear(fc_width, num_classes)]
    net = nn.Sequential(*layers)
    if init == "glorot":
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
    elif init != "torch":
        raise ValueError(f"torch_vgg: init must be 'torch' or 'glorot', got {init!r}")
    return net
