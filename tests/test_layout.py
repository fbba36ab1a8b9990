"""The package's structure: no import cycles, lower modules never import higher ones,
inference commands never load the trainer, and every registered task has the Task interface."""

import ast
import json
import subprocess
import sys

import pytest

from conftest import ROOT

PACKAGE = ROOT / "gpt"


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def gpt_imports(path) -> set[str]:
    """Every gpt module a file imports, anywhere in it: inside functions too (a lazy import
    still counts) and under `if TYPE_CHECKING:` (an annotation-only import still counts)."""
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.split(".")[0] == "gpt")
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "gpt":
                found.add(child.module)
                for alias in child.names:  # from gpt import model -> gpt.model
                    if (ROOT / child.module.replace(".", "/") / f"{alias.name}.py").exists():
                        found.add(f"{child.module}.{alias.name}")
            visit(child)

    visit(ast.parse(path.read_text()))
    # importing gpt.tasks.lm runs gpt/tasks/__init__.py first: a dependency on the package too, except
    # for a module inside that package (gpt.tasks.gpt1 importing gpt.tasks.classify), which the package's
    # __init__ has necessarily started to import already
    me = module_name(path)
    for name in list(found):
        parts = name.split(".")
        found.update(p for p in (".".join(parts[:i]) for i in range(2, len(parts))) if not me.startswith(p + "."))
    found.discard("gpt")  # the package itself: errors + lazy access to GPT / GPTConfig
    return found - {me}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): gpt_imports(p) for p in sorted(PACKAGE.rglob("*.py")) if module_name(p) != "gpt"}


def test_there_is_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "gpt.model" in graph and "gpt.tasks.lm" in graph  # the scan sees the package
    visiting, done = [], set()

    def walk(node):
        if node in visiting:
            cycle = visiting[visiting.index(node):] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        visiting.append(node)
        for dep in sorted(graph.get(node, ())):
            walk(dep)
        visiting.pop()
        done.add(node)

    for node in graph:
        walk(node)


@pytest.mark.parametrize("module, allowed", [
    ("gpt.errors", set()),
    ("gpt.atomic", {"gpt.errors"}),
    ("gpt.system", {"gpt.errors"}),
    ("gpt.tokenizer", {"gpt.errors", "gpt.atomic"}),
    ("gpt.checkpoint", {"gpt.errors", "gpt.atomic", "gpt.model", "gpt.tokenizer", "gpt.system", "gpt.hf"}),
    ("gpt.positions", set()),  # formulas only
    ("gpt.attention", {"gpt.errors", "gpt.positions"}),  # the attention layers and their cache
    ("gpt.model", {"gpt.errors", "gpt.system", "gpt.positions", "gpt.attention"}),  # the network alone: no hf, files, tokenizers, training
    ("gpt.sampling", {"gpt.errors", "gpt.model", "gpt.system"}),  # no files (system: free memory)
    ("gpt.parallel", {"gpt.errors", "gpt.system"}),  # knows no model, trainer or checkpoint file
    ("gpt.dataset", {"gpt.errors"}),
    ("gpt.objectives", set()),  # the corruptions and targets of the objectives: tensors only
    ("gpt.hf", {"gpt.errors", "gpt.atomic", "gpt.model", "gpt.objectives"}),  # (the masked LM's token: not exported)
    ("gpt.optim", {"gpt.errors", "gpt.config"}),  # the optimisers and the schedule: no model, trainer or files
])
def test_lower_modules_import_only_lower_ones(module, allowed):
    imports = import_graph()[module]
    assert imports <= allowed, f"{module} imports {sorted(imports - allowed)}"


def modules_after_importing(code: str) -> list[str]:
    """The module names loaded by running `code` in a fresh interpreter."""
    script = code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_the_model_alone_does_not_load_training_hf_or_tasks():
    loaded = modules_after_importing("import gpt.model")
    assert "gpt.model" in loaded
    for higher in ("gpt.hf", "gpt.trainer", "gpt.tasks", "gpt.config", "gpt.tokenizer", "gpt.checkpoint"):
        assert higher not in loaded, higher


def test_inference_commands_do_not_load_the_trainer():
    ddp = "torch.nn.parallel.distributed"
    torch_alone = set(modules_after_importing("import torch"))
    sample = set(modules_after_importing("import sample"))  # sample.py, the command line (not run)
    assert "gpt.sampling" in sample and "gpt.checkpoint" in sample
    for heavy in ("gpt.trainer", "gpt.tasks", "gpt.prepare", "gpt.config"):
        assert heavy not in sample, heavy
    # DDP: torch itself may import its module (torch 2.13 does); sample.py must add nothing of it
    assert (ddp in sample) <= (ddp in torch_alone)
    for command in ("gpt.classify", "gpt.evaluate", "gpt.inspect", "gpt.serve"):
        loaded = modules_after_importing(f"import {command}")
        assert "gpt.trainer" not in loaded and "gpt.config" not in loaded, command
    assert "matplotlib" not in modules_after_importing("import gpt.plot")  # imported only when drawing


def test_every_registered_task_has_the_task_interface():
    from gpt.config import SECTIONS
    from gpt.tasks import TASKS
    from gpt.tasks.base import Task

    methods = [name for name, value in vars(Task).items() if callable(value) and not name.startswith("_")]
    assert {"build_model", "next_batch", "loss", "evaluate", "summarize", "state_dict", "checkpoint_info"} <= set(methods)
    for name, task in TASKS.items():
        missing = [m for m in methods if not callable(getattr(task, m, None))]
        assert not missing, f"task {name} lacks {missing}"
        assert hasattr(task, "Settings")
        if task.Settings is not None:
            assert SECTIONS[name] is task.Settings  # its own [section] in the config
