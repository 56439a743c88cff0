"""The layering the code relies on: no import cycles, models never import the engine, scripts never import
scripts, every module says its job first; the checkpoint-layout and dataset registries' contracts."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ('models', 'engine', 'data', 'transform')
# Known arrows that other branches remove (FSDP: momentum's all-gathers; export: the HF reader's lazy import).
# An arrow not listed here fails the test.
KNOWN = {('models.momentum', 'engine.distributed'), ('models.checkpoint', 'models.convert_hf')}


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob('*.py'):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ('tests', 'benchmarks') or rel.parts[0].startswith('.'):
            continue
        name = '.'.join(rel.with_suffix('').parts).removesuffix('.__init__')
        found[name] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Project modules each module imports, lazily (inside a function) or not."""
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def _arrows() -> set[tuple[str, str]]:
    return {(m, d) for m, deps in _imports(_modules()).items() for d in deps} - KNOWN


def test_no_import_cycle():
    graph = {}
    for m, d in _arrows():
        graph.setdefault(m, set()).add(d)

    def reaches(start: str, goal: str, seen: set) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)):
                return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, set()))
    assert not cycles, f'modules on an import cycle: {cycles}'


def test_models_do_not_import_the_engine_and_scripts_do_not_import_scripts():
    scripts = {m for m in _modules() if '.' not in m and m not in PACKAGES}
    upward = sorted((m, d) for m, d in _arrows() if m.startswith('models') and d.startswith('engine'))
    sideways = sorted((m, d) for m, d in _arrows() if m in scripts and d in scripts)
    assert not upward and not sideways


def test_every_module_starts_with_a_docstring():
    undocumented = [str(p.relative_to(ROOT)) for p in _modules().values() if not p.read_text().startswith('"""')]
    assert not undocumented


class _Twin(nn.Module):
    def __init__(self):
        super().__init__()
        self.text_encoder, self.text_encoder_m = nn.Linear(2, 2), nn.Linear(2, 2)
        self.register_buffer('image_queue', torch.zeros(2))


def test_check_missing_allows_only_the_declared_gaps_and_names_the_others():
    from models.checkpoint import CheckpointError
    from models.layout import MAY_BE_MISSING, check_missing
    model = _Twin()
    assert check_missing('blip_retrieval', model, ['image_queue'], 'f.pth') == {'image_queue'}
    momentum = ['text_encoder_m.weight', 'text_encoder_m.bias']
    assert check_missing('blip_retrieval', model, momentum, 'f.pth') == set(momentum)   # all at once: allowed
    with pytest.raises(CheckpointError, match=r"blip_retrieval: checkpoint f\.pth lacks 1 key.*text_encoder_m\.bias"):
        check_missing('blip_retrieval', model, ['text_encoder_m.bias'], 'f.pth')          # one of them: not
    with pytest.raises(CheckpointError, match=r"blip_decoder: .*\['image_queue'\]"):
        check_missing('blip_decoder', model, ['image_queue'], 'f.pth')
    # every model factory with a checkpoint declares its gaps
    factories = {n.name for p in (ROOT / 'models').glob('blip*.py') for n in ast.parse(p.read_text()).body
                 if isinstance(n, ast.FunctionDef) and n.name.startswith('blip_')
                 and any(a.arg == 'pretrained' for a in n.args.args)}
    assert factories == set(MAY_BE_MISSING)


def test_a_registered_dataset_is_built_by_create_dataset_with_the_shared_request(monkeypatch):
    import data
    monkeypatch.setattr(data, '_BUILDERS', dict(data._BUILDERS))
    data.register_dataset('echo')(lambda r: (r.dataset, r.image_size, r.skip, r.req('ann_root')))
    assert data.create_dataset('echo', {'image_size': 16, 'ann_root': 'a'}) == ('echo', 16, False, 'a')
    with pytest.raises(KeyError, match="config has no key 'ann_root', which dataset 'echo' needs"):
        data.create_dataset('echo', {'image_size': 16})
