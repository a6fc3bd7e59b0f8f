"""The tools example's tool, written as for TRL's ``GRPOTrainer(tools=[calculator])``: a plain function
with type hints and a Google-style docstring (its schema is transformers' ``get_json_schema`` of it)."""

from __future__ import annotations

import ast
import operator

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculator(expression: str) -> str:
    """Computes an arithmetic expression of integers with +, - and *.

    Args:
        expression: The expression to compute, e.g. "37 * 48".
    """
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not an arithmetic expression of integers: {expression!r}")
    return str(value(ast.parse(expression.replace("×", "*").replace("x", "*"), mode="eval").body))
