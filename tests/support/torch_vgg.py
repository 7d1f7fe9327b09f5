"""torchvision's VGG module layout in plain `torch.nn`: the PyTorch oracle of the weight tests.

torchvision itself is not installed here (its PyPI wheel needs the CUDA build of torch), so
this rebuilds `torchvision.models.vgg.VGG` from torchvision's own `cfgs` notation, written
out below independently of minivgg's Table 1 data: same modules, same order, so the
state_dict keys are torchvision's and `load_state_dict` takes a torchvision file.
"""

import torch

# torchvision.models.vgg.cfgs: numbers are conv3 output channels, "M" a 2x2 max-pool.
TORCHVISION_CFGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"],
}


class TorchvisionLayoutVGG(torch.nn.Module):
    """torchvision's VGG module structure (`features`, `avgpool`, `classifier`).

    `width` divides every conv's channels (1 = the published nets), `fc_width` is fc6/fc7's.
    """

    def __init__(self, config, fc_width=4096, num_classes=1000, width=1):
        super().__init__()
        layers, in_ch = [], 3
        for v in TORCHVISION_CFGS[config]:
            if v == "M":
                layers.append(torch.nn.MaxPool2d(2, 2))
            else:
                layers += [torch.nn.Conv2d(in_ch, v // width, 3, padding=1), torch.nn.ReLU()]
                in_ch = v // width
        self.features = torch.nn.Sequential(*layers)
        self.avgpool = torch.nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(in_ch * 7 * 7, fc_width), torch.nn.ReLU(), torch.nn.Dropout(),
            torch.nn.Linear(fc_width, fc_width), torch.nn.ReLU(), torch.nn.Dropout(),
            torch.nn.Linear(fc_width, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def make_torch_vgg(config, seed=0, **sizes):
    """A TorchvisionLayoutVGG with torch's default random init, in eval mode."""
    torch.manual_seed(seed)
    return TorchvisionLayoutVGG(config, **sizes).eval()


def torch_logits(net, x):
    """net(x) for a NumPy batch, as NumPy."""
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()
