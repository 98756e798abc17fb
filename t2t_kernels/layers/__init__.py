from .common import Attention, Block, DropPath, Mlp
from .t2t import SoftSplit, T2T_module, Token_performer, Token_transformer

__all__ = ["Attention", "Block", "DropPath", "Mlp", "SoftSplit", "T2T_module", "Token_performer", "Token_transformer"]
