"""`tb-convviz demo`: a synthetic shapes dataset, a 5-conv AlexNet and a training loop that logs convviz."""

from tb_convviz.demo.data import DataError, DemoData, load_data, parse_spec
from tb_convviz.demo.model import DemoAlexNet
from tb_convviz.demo.shapes import Shapes
from tb_convviz.demo.train import evaluate, train

__all__ = ["DataError", "DemoAlexNet", "DemoData", "Shapes", "evaluate", "load_data", "parse_spec", "train"]
