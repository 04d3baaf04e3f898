"""A user-defined module class, pickled whole by gen_checkpoints.py (torch.save(model)).

torch.load needs to import it to build the ground truth; ckptfs only sees its name.
"""
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 2)
        self.register_buffer("scale", torch.tensor([0.5, 2.0]))

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3))) * self.scale


class AttributeDict(dict):
    """Like Lightning's AttributeDict: a dict subclass with attribute access."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e
