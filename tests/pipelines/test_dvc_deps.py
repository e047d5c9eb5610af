"""dvc.yaml's deps cover every project module a stage's `kedro run` can execute, so an edit
to any of them reruns the stage in `dvc repro`.

The imports are read with `ast`, never executed: from the stage's pipeline package, the
modules every `kedro run` loads (settings, pipeline registry) and the project dataset
classes named in the catalog files (all of them for every stage: simpler than reading which
entries a pipeline uses, and it can only ask for too much), follow `import instseg_pipeline.x`,
`from instseg_pipeline.x import y` (y may be a module), relative imports, imports inside
functions and `importlib.import_module(f"instseg_pipeline.pkg.{name}")` (the whole `pkg`).
`find_pipelines` also imports the other stages' pipeline packages, but their nodes do not
run, so an edit there cannot change this stage's outputs: they are not followed.

Stages written with `foreach` / `do` (one per configuration) are expanded first, as DVC
names them (`<stage>@<key>`), `${item.<key>}` and `${<vars key>}` filled in.
"""
from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "instseg_pipeline"
RUN_MODULES = ("settings", "pipeline_registry")  # loaded by every `kedro run`
IMPORT_FUNCTIONS = {"import_module", "__import__"}
TEMPLATE = re.compile(r"\$\{\s*([\w.]+)\s*\}")


class TemplateError(ValueError):
    """A `${...}` in dvc.yaml that the expansion cannot fill."""


def _fill(value, context: dict, where: str):
    """`value` (str, list or dict, keys included) with every `${name.key}` taken from
    `context`; a string that is one whole `${...}` takes the value itself."""
    if isinstance(value, dict):
        return {_fill(k, context, where): _fill(v, context, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, context, where) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(name: str):
        found = context
        for part in name.split("."):
            if not isinstance(found, dict) or part not in found:
                raise TemplateError(f"{where}: ${{{name}}} names nothing in vars or the item")
            found = found[part]
        return found

    whole = TEMPLATE.fullmatch(value.strip())
    if whole:
        return lookup(whole.group(1))
    return TEMPLATE.sub(lambda match: str(lookup(match.group(1))), value)


def expand_stages(dvc: dict) -> dict[str, dict]:
    """dvc.yaml's stages as DVC runs them: a `foreach` (a mapping, a list, or `${name}` of
    `vars`) gives one stage `<name>@<key>` per item (`<name>@<index>` for a list of
    mappings) from its `do`, with `${item...}` and `${<vars key>}` filled in."""
    context: dict = {}
    for entry in dvc.get("vars", []):
        if isinstance(entry, dict):
            context.update(entry)
    stages = {}
    for name, spec in (dvc.get("stages") or {}).items():
        if "foreach" not in spec:
            stages[name] = _fill(spec, context, f"stages.{name}")
            continue
        items = _fill(spec["foreach"], context, f"stages.{name}.foreach")
        keyed = items.items() if isinstance(items, dict) else (
            ((i if isinstance(v, dict | list) else v), v) for i, v in enumerate(items))
        for key, item in keyed:
            stages[f"{name}@{key}"] = _fill(spec["do"], {**context, "item": item},
                                            f"stages.{name}@{key}")
    return stages


def read_stages(root: Path) -> dict[str, dict]:
    """The expanded stages of `root`/dvc.yaml."""
    return expand_stages(yaml.safe_load((root / "dvc.yaml").read_text()))


def output_paths(spec: dict) -> list[str]:
    """A stage's outs, metrics and plots (an entry is a path or {path: options})."""
    entries = [e for kind in ("outs", "metrics", "plots") for e in spec.get(kind, [])]
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def pipeline_name(stage: str, cmd: str) -> str:
    """The pipeline a stage's `kedro run --pipelines <name>` runs (else the stage's name,
    without its `@<key>`)."""
    match = re.search(r"(?:--pipelines?|-p)[ =](\S+)", cmd)
    return match.group(1) if match else stage.split("@")[0]


class DynamicImportError(ValueError):
    """An `import_module(...)` whose module name the walk cannot read from the source."""


def module_name(src: Path, path: Path) -> str:
    """Dotted name of `path` under `src`: a/b/c.py -> a.b.c, a/b/__init__.py -> a.b."""
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_file(src: Path, name: str) -> Path | None:
    """The file defining module `name` (a/b.py or a/b/__init__.py), None when neither exists."""
    base = src.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def package_inits(src: Path, path: Path) -> set[Path]:
    """The __init__.py of every package above `path` (importing a.b.c runs a and a.b)."""
    inits = set()
    for folder in path.relative_to(src).parents:
        init = src / folder / "__init__.py"
        if init.is_file():
            inits.add(init)
    return inits


def _relative_base(module: str, is_package: bool, level: int) -> str:
    """The package `from <level dots> import` starts from, inside `module`."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    return ".".join(parts[: len(parts) - (level - 1)])


def _from_names(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Candidate module names of a `from X import y, z`: X, X.y, X.z (y may be a module)."""
    origin = node.module or ""
    if node.level:
        base = _relative_base(module, is_package, node.level)
        origin = f"{base}.{origin}" if origin else base
    return [origin, *(f"{origin}.{alias.name}" for alias in node.names if alias.name != "*")]


def _dynamic_name(node: ast.Call, path: Path) -> tuple[str, bool] | None:
    """(module name, whole package?) of an `import_module(...)` call, None for other calls.

    An f-string counts by its literal prefix: `f"pkg.sub.{kind}"` imports some module of
    `pkg.sub`, so the whole package does.
    """
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called not in IMPORT_FUNCTIONS or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value, False
    if isinstance(arg, ast.JoinedStr) and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rsplit(".", 1)[0], True
    raise DynamicImportError(f"{path}:{node.lineno}: {called}() of a name that is not a "
                             "literal or an f-string with a literal package prefix; the "
                             "dvc deps test cannot tell which modules it imports")


def direct_imports(src: Path, path: Path, package: str = PACKAGE) -> set[Path]:
    """Project files `path` imports anywhere in its body (module level or inside functions)."""
    module = module_name(src, path)
    is_package = path.name == "__init__.py"
    names, packages = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(_from_names(node, module, is_package))
        elif isinstance(node, ast.Call) and (dynamic := _dynamic_name(node, path)):
            (packages if dynamic[1] else names).add(dynamic[0])
    project = {n for n in names | packages if n == package or n.startswith(f"{package}.")}
    files = {f for n in project & names if (f := module_file(src, n))}
    for name in project & packages:
        folder = src.joinpath(*name.split("."))
        files.update(folder.rglob("*.py") if folder.is_dir() else {module_file(src, name)} - {None})
    return files


def imported_files(src: Path, starts: Iterable[Path], package: str = PACKAGE,
                   skip: Iterable[Path] = ()) -> set[Path]:
    """`starts`, their package __init__ files and every project file they import, transitively;
    files under a folder of `skip` are left out (and not followed)."""
    skip = tuple(skip)
    seen: set[Path] = set()
    todo = list(starts)
    while todo:
        path = todo.pop()
        if path in seen or any(path.is_relative_to(folder) for folder in skip):
            continue
        seen.add(path)
        todo.extend(package_inits(src, path) | direct_imports(src, path, package))
    return seen


def catalog_modules(conf: Path, envs: Iterable[str], package: str = PACKAGE) -> set[str]:
    """Modules of the project dataset classes named by `type:` in the envs' catalog files
    (nested ones too, e.g. a PartitionedDataset's `dataset:`)."""
    found: set[str] = set()

    def visit(value) -> None:
        if isinstance(value, dict):
            kind = value.get("type")
            if isinstance(kind, str) and kind.startswith(f"{package}."):
                found.add(kind.rsplit(".", 1)[0])
            for child in value.values():
                visit(child)
        elif isinstance(value, list):
            for child in value:
                visit(child)

    for env in envs:
        for path in sorted((conf / env).rglob("*.y*ml")):
            if any(part.startswith("catalog") for part in path.relative_to(conf / env).parts):
                visit(yaml.safe_load(path.read_text()))
    return found


def stage_envs(cmd: str) -> list[str]:
    """Config envs a stage's `kedro run` reads: base plus its `--env` (local by default)."""
    match = re.search(r"(?:--env|-e)[ =](\S+)", cmd)
    return ["base", match.group(1) if match else "local"]


def stage_starts(root: Path, stage: str, cmd: str, package: str = PACKAGE) -> set[Path]:
    """Files a `kedro run --pipelines <stage>` executes code of, before following imports."""
    src = root / "src"
    pipeline = src / package / "pipelines" / stage
    if not pipeline.is_dir():
        raise FileNotFoundError(f"dvc.yaml stage {stage!r} has no pipeline package {pipeline}")
    names = (*(f"{package}.{name}" for name in RUN_MODULES),
             *catalog_modules(root / "conf", stage_envs(cmd), package))
    return set(pipeline.rglob("*.py")) | {f for n in names if (f := module_file(src, n))}


def other_pipelines(root: Path, stage: str, package: str = PACKAGE) -> list[Path]:
    """The pipeline packages of the other stages. Every `kedro run` imports them (the
    registry builds them all, the default run from all of them) but runs none of their
    nodes, so an edit there cannot change this stage's output."""
    folder = root / "src" / package / "pipelines"
    return [p for p in folder.iterdir() if p.is_dir() and p.name not in (stage, "__pycache__")]


def covered(path: str, deps: Iterable[str]) -> bool:
    """Whether a dep is `path` itself or a folder above it (both relative, POSIX)."""
    return any(path == dep or path.startswith(f"{dep.rstrip('/')}/") for dep in deps)


def uncovered_by_stage(root: Path, package: str = PACKAGE) -> dict[str, list[str]]:
    """Per dvc.yaml stage, the imported project files none of its deps covers."""
    missing = {}
    for stage, spec in read_stages(root).items():
        pipeline = pipeline_name(stage, spec["cmd"])
        starts = stage_starts(root, pipeline, spec["cmd"], package)
        files = sorted(p.relative_to(root).as_posix()
                       for p in imported_files(root / "src", starts, package,
                                               other_pipelines(root, pipeline, package)))
        missing[stage] = [f for f in files if not covered(f, spec.get("deps", []))]
    return {stage: files for stage, files in missing.items() if files}


def missing_deps(root: Path) -> dict[str, list[str]]:
    """Per stage, deps that neither exist nor are produced by a stage (outs appear on repro)."""
    stages = read_stages(root)
    outs = {out for spec in stages.values() for out in output_paths(spec)}
    missing = {stage: [d for d in spec.get("deps", []) if d not in outs and not (root / d).exists()]
               for stage, spec in stages.items()}
    return {stage: deps for stage, deps in missing.items() if deps}


def suggested_dep(path: str) -> str:
    """The dep that covers `path`: its stage folder (src/pkg/data), its pipeline package
    (src/pkg/pipelines/train), or the file itself for a top-level module."""
    parts = path.split("/")
    depth = 4 if parts[2] == "pipelines" else 3
    return path if len(parts) <= depth else "/".join(parts[:depth])


def report(missing: dict[str, list[str]]) -> str:
    """Per stage, the uncovered files and the dvc.yaml dep lines that would cover them."""
    lines = []
    for stage, files in missing.items():
        lines.append(f"stage {stage!r} imports files none of its deps covers:")
        lines += [f"    {path}" for path in files]
        where = f"stages.{stage.split('@')[0]}" + (".do" if "@" in stage else "")
        lines.append(f"  add to {where}.deps in dvc.yaml:")
        lines += [f"    - {dep}" for dep in dict.fromkeys(suggested_dep(f) for f in files)]
    return "\n".join(lines)


# --- the project's dvc.yaml --------------------------------------------------------------

def test_every_stage_dep_covers_what_the_stage_imports():
    missing = uncovered_by_stage(REPO)
    assert not missing, "dvc.yaml deps miss imported project modules:\n" + report(missing)


def test_every_dvc_dep_exists():
    missing = missing_deps(REPO)
    assert not missing, f"dvc.yaml deps that do not exist (and no stage produces): {missing}"


# --- the helpers, on a fake project ------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


FAKE_DEPS = ("data/in", "src/pkg/__init__.py", "src/pkg/settings.py",
             "src/pkg/pipeline_registry.py", "src/pkg/ext", "src/pkg/core", "src/pkg/plugins",
             "src/pkg/pipelines/__init__.py", "src/pkg/pipelines/train")


@pytest.fixture()
def fake_project(tmp_path) -> Path:
    """A tiny project: one stage whose node imports lazily, relatively and dynamically."""
    _write(tmp_path, {
        "src/pkg/__init__.py": "",
        "src/pkg/settings.py": "from pkg.ext import hooks\n",
        "src/pkg/pipeline_registry.py": "from kedro.framework.project import find_pipelines\n",
        "src/pkg/ext/__init__.py": "",
        "src/pkg/ext/hooks.py": "",
        "src/pkg/ext/datasets.py": "import pkg.core.io\n",
        "src/pkg/core/__init__.py": "",
        "src/pkg/core/io.py": "",
        "src/pkg/core/lazy.py": "import importlib\n\ndef f(kind):\n"
                                "    return importlib.import_module(f'pkg.plugins.{kind}')\n",
        "src/pkg/plugins/__init__.py": "",
        "src/pkg/plugins/a.py": "",
        "src/pkg/plugins/b.py": "",
        "src/pkg/unused.py": "",
        "src/pkg/pipelines/__init__.py": "",
        "src/pkg/pipelines/train/__init__.py": "from .nodes import run\n",
        "src/pkg/pipelines/train/nodes.py": "def run():\n    from pkg.core import lazy\n",
        "conf/base/catalog.yml": "model:\n  type: pkg.ext.datasets.ModelDataset\n"
                                 "table:\n  type: pandas.ParquetDataset\n",
        "dvc.yaml": "stages:\n  train:\n    cmd: kedro run --env ci --pipelines train\n"
                    "    deps:\n" + "".join(f"      - {dep}\n" for dep in FAKE_DEPS)
                    + "    outs:\n      - data/out\n",
    })
    (tmp_path / "data/in").mkdir(parents=True)
    return tmp_path


def test_import_walk_follows_lazy_relative_dynamic_and_catalog_imports(fake_project):
    src = fake_project / "src"
    starts = stage_starts(fake_project, "train", "kedro run --env ci --pipelines train", "pkg")
    found = {p.relative_to(src).as_posix() for p in imported_files(src, starts, "pkg")}
    assert found == {
        "pkg/__init__.py", "pkg/settings.py", "pkg/pipeline_registry.py",
        "pkg/ext/__init__.py", "pkg/ext/hooks.py", "pkg/ext/datasets.py",
        "pkg/core/__init__.py", "pkg/core/io.py", "pkg/core/lazy.py",
        "pkg/plugins/__init__.py", "pkg/plugins/a.py", "pkg/plugins/b.py",
        "pkg/pipelines/__init__.py", "pkg/pipelines/train/__init__.py",
        "pkg/pipelines/train/nodes.py",
    }
    assert uncovered_by_stage(fake_project, "pkg") == {}
    assert missing_deps(fake_project) == {}


def test_a_removed_dep_is_reported_with_the_line_to_add(fake_project):
    dvc = fake_project / "dvc.yaml"
    dvc.write_text(dvc.read_text().replace("      - src/pkg/plugins\n", ""))
    missing = uncovered_by_stage(fake_project, "pkg")
    assert missing == {"train": ["src/pkg/plugins/__init__.py", "src/pkg/plugins/a.py",
                                 "src/pkg/plugins/b.py"]}
    assert report(missing).endswith(
        "  add to stages.train.deps in dvc.yaml:\n    - src/pkg/plugins")


@pytest.mark.parametrize(("path", "dep"), [
    ("src/pkg/data/sources/coco.py", "src/pkg/data"),
    ("src/pkg/pipelines/train/nodes.py", "src/pkg/pipelines/train"),
    ("src/pkg/pipelines/__init__.py", "src/pkg/pipelines/__init__.py"),
    ("src/pkg/settings.py", "src/pkg/settings.py"),
])
def test_the_suggested_dep_is_the_stage_folder_or_the_top_level_file(path, dep):
    assert suggested_dep(path) == dep


def test_a_dep_that_does_not_exist_is_reported(fake_project):
    dvc = fake_project / "dvc.yaml"
    dvc.write_text(dvc.read_text().replace("- src/pkg/core\n", "- src/pkg/kore\n"))
    assert missing_deps(fake_project) == {"train": ["src/pkg/kore"]}


def test_an_unreadable_dynamic_import_fails_naming_the_file(tmp_path):
    _write(tmp_path, {"src/pkg/__init__.py": "import importlib\nimportlib.import_module(name)\n"})
    with pytest.raises(DynamicImportError, match=r"pkg/__init__.py:2"):
        direct_imports(tmp_path / "src", tmp_path / "src/pkg/__init__.py", "pkg")


FOREACH_DVC = """\
vars:
  - envs:
      a: {env: local, data: data/in}
      b: {env: ci, data: data/in_ci}
stages:
  train:
    foreach: ${envs}
    do:
      cmd: kedro run --env ${item.env} --pipelines train
      deps:
        - ${item.data}
""" + "".join(f"        - {dep}\n" for dep in FAKE_DEPS[1:]) + """\
      params:
        - conf/${item.env}/parameters.yml:
            - train
      outs:
        - data/out_${item.env}
      metrics:
        - data/metrics_${item.env}.json
"""


def test_foreach_stages_are_expanded_per_item_and_checked(fake_project):
    (fake_project / "dvc.yaml").write_text(FOREACH_DVC)
    (fake_project / "data/in_ci").mkdir()
    stages = read_stages(fake_project)
    assert list(stages) == ["train@a", "train@b"]
    assert stages["train@b"]["cmd"] == "kedro run --env ci --pipelines train"
    assert stages["train@b"]["deps"][0] == "data/in_ci"
    assert stages["train@b"]["params"] == [{"conf/ci/parameters.yml": ["train"]}]
    assert output_paths(stages["train@a"]) == ["data/out_local", "data/metrics_local.json"]
    assert uncovered_by_stage(fake_project, "pkg") == {}
    assert missing_deps(fake_project) == {}

    (fake_project / "dvc.yaml").write_text(FOREACH_DVC.replace("        - src/pkg/plugins\n", ""))
    missing = uncovered_by_stage(fake_project, "pkg")
    assert set(missing) == {"train@a", "train@b"}
    assert "  add to stages.train.do.deps in dvc.yaml:\n    - src/pkg/plugins" in report(missing)


def test_a_template_naming_nothing_fails_naming_the_stage():
    spec = {"stages": {"train": {"foreach": {"a": {"env": "ci"}},
                                 "do": {"cmd": "kedro run --env ${item.nev}"}}}}
    with pytest.raises(TemplateError, match=r"stages\.train@a: \$\{item\.nev\} names nothing"):
        expand_stages(spec)
