"""No function of ioisray copies Python data or a host random draw to the GPU each time it runs.

`torch.tensor(values, device=cuda)` copies `values` from pageable host memory, and PyTorch waits for
the GPU's queue to drain before such a copy: once per batch (or per sampler step) it stalls the
pipeline that non-blocking batch transfers keep full. The rule, over every function in ioisray/ (code
in a function runs per call; module level runs once):

  A. `torch.tensor(data, ...)` / `torch.as_tensor(data, ...)` put on a device (a `device=` keyword, or
     `.to(...)` / `.cuda()` right after it) where `data` is Python data: a literal, a list, tuple, set
     or dict display, a comprehension, arithmetic on those, a builtin's value (`float(v)`, `len(v)`, ...),
     or a module constant (a name assigned a
     constant at module level, or an UPPER_CASE name). Such a tensor is made once per device
     (transforms.on_device) or registered as a buffer.
  B. A random draw (`torch.rand`, `randn`, `randint`, `randperm`, ...) followed by `.to(...)` /
     `.cuda()`: drawn on the host, then copied. Draw it on the data's device (mixup.generator_on).

`device="cpu"` (or `.to("cpu")`) is no copy to a GPU and is not flagged. A tensor passed in (`data`
a parameter or any other name) is not Python data and is not flagged either: moving batches is the
loop's job, done without blocking."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ioisray"
FACTORIES = {"tensor", "as_tensor"}
DRAWS = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli",
         "multinomial", "normal", "poisson"}
PYTHON_VALUES = {"float", "int", "bool", "len", "list", "tuple", "range", "sorted"}  # builtins that make Python data
UPPER_CASE = re.compile(r"^_?[A-Z][A-Z0-9_]*$")


def _torch_call(node: ast.AST, names: set[str]) -> bool:
    """`torch.<name>(...)` for a name in `names`."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch")


def _is_cpu(node: ast.AST) -> bool:
    """The literal "cpu", or torch.device("cpu")."""
    if isinstance(node, ast.Constant):
        return node.value == "cpu"
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "device"
            and len(node.args) == 1 and _is_cpu(node.args[0]))


def _moved_to_a_device(call: ast.Call, parent: ast.AST | None) -> bool:
    """A `device=` other than the CPU, or the call's result is moved by `.to(...)` / `.cuda()`."""
    device = next((k.value for k in call.keywords if k.arg == "device"), None)
    if device is not None and not _is_cpu(device):
        return True
    if isinstance(parent, ast.Attribute) and parent.value is call and parent.attr in ("to", "cuda"):
        return True
    return False


class _Constants:
    """Which expressions of one module are Python data known before the module runs."""

    def __init__(self, tree: ast.Module):
        self.names: set[str] = set()
        for stmt in tree.body:
            targets = (stmt.targets if isinstance(stmt, ast.Assign) else
                       [stmt.target] if isinstance(stmt, ast.AnnAssign) and stmt.value is not None else [])
            if targets and self.is_data(stmt.value):
                self.names |= {t.id for t in targets if isinstance(t, ast.Name)}

    def is_data(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return True
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            return all(self.is_data(e) or isinstance(e, ast.Name) for e in node.elts)
        if isinstance(node, ast.Dict):
            return True
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            return True
        if isinstance(node, ast.UnaryOp):
            return self.is_data(node.operand)
        if isinstance(node, ast.BinOp):
            return self.is_data(node.left) and self.is_data(node.right)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in PYTHON_VALUES:
            return True
        if isinstance(node, ast.Name):
            return node.id in self.names or bool(UPPER_CASE.match(node.id))
        return False


def offences(source: str, where: str = "<source>") -> list[str]:
    """Every place in `source` that breaks rule A or B (see the module's docstring), as 'where:line: code'."""
    tree = ast.parse(source)
    constants = _Constants(tree)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.Call):
                continue
            data = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "data"), None)
            copies_data = (_torch_call(node, FACTORIES) and data is not None and constants.is_data(data)
                           and _moved_to_a_device(node, parents.get(node)))
            parent = parents.get(node)
            copies_draw = (_torch_call(node, DRAWS) and isinstance(parent, ast.Attribute)
                           and parent.value is node and parent.attr in ("to", "cuda")
                           and not (isinstance(parents.get(parent), ast.Call)
                                    and any(_is_cpu(a) for a in parents[parent].args)))
            if copies_data or copies_draw:
                found.append(f"{where}:{node.lineno}: {ast.get_source_segment(source, node)}")
    return sorted(set(found))


def test_no_function_copies_python_data_or_a_host_draw_to_the_device():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += offences(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert found == []


@pytest.mark.parametrize("code", [
    "def f(x):\n    return torch.tensor(MEAN, device=x.device, dtype=x.dtype)",
    "GREY = (0.3, 0.6, 0.1)\ndef f(x):\n    return torch.tensor(GREY, device=x.device)",
    "_w = [0.3, 0.6, 0.1]\ndef f(x):\n    return torch.as_tensor(_w, device=x.device)",
    "def f(x, h, w):\n    return torch.tensor([[0.0, 0.0, h, w]], device=x.device).expand(4, 4)",
    "def f(x):\n    return torch.tensor(1.5).to(x.device)",
    "def f(n, g, x):\n    return torch.randperm(n, generator=g, device=g.device).to(x.device)",
    "def f(x):\n    return torch.rand(3).cuda()",
    "def f(y):\n    return torch.tensor(len(y), device=y.device)",
    "class T:\n    def __call__(self, x):\n        return torch.tensor([v * 2 for v in range(3)], device='cuda')",
])
def test_the_rule_catches(code):
    assert len(offences(code)) == 1


@pytest.mark.parametrize("code", [
    "MEAN = (0.5,)\nm = torch.tensor(MEAN, device='cuda')",  # module level: runs once
    "def f(values, device):\n    return torch.tensor(values, device=device)",  # a parameter: the caller's data
    "def f(x):\n    return torch.tensor(MEAN, device='cpu')",
    "def f(x):\n    return torch.tensor([1.0, 2.0], device=torch.device('cpu'))",
    "def f(x):\n    return torch.tensor(float(x.sum()))",  # no device: stays on the CPU
    "def f(n, x):\n    return torch.randperm(n, device=x.device)",
    "def f(x):\n    return torch.rand(3).to('cpu')",
    "def f(x, device):\n    return x.to(device, non_blocking=True)",
])
def test_the_rule_lets_pass(code):
    assert offences(code) == []
