"""Security checks over the code base: no string-built SQL, no secret in code or rendered
templates, model archives extracted safely.

Secrets in logs and XCom are checked at run time by the reliability matrix
(``tests/reliability``): every row runs the tasks with a known catalogue password and
asserts it is in none of the captured log lines or task return values.
"""

from __future__ import annotations

import ast
import io
import re
import tarfile
from pathlib import Path

import pytest


# The archive tests need the job code (torch); the rest also runs on Airflow 3.0.x's venv
# (scripts/test_oldest_airflow.sh), where torch is not installed and these tests skip.
def _model_module():
    return pytest.importorskip("sku_jobs.model", reason="the job code needs torch")

ROOT = Path(__file__).resolve().parents[2]
# Code that runs in Airflow, in the job containers, or that the dev tools run against a database.
CODE_DIRS = ("dags", "plugins", "training_image/code", "devtools", "scripts", "deploy")
SQL_METHODS = {"execute", "executemany", "copy", "mogrify"}


def python_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def _constant_strings(tree: ast.Module) -> set[str]:
    """Module-level names bound to a string built only from literals and such names."""
    names: set[str] = set()

    def literal(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return True
        if isinstance(node, ast.Name):
            return node.id in names
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return literal(node.left) and literal(node.right)
        if isinstance(node, ast.JoinedStr):
            return all(isinstance(v, ast.Constant) or (isinstance(v, ast.FormattedValue) and literal(v.value))
                       for v in node.values)
        return False

    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            if literal(stmt.value):
                names.add(stmt.targets[0].id)
    return names


def string_built_sql(source: str, filename: str = "<test>") -> list[str]:
    """Calls of ``execute``/``executemany``/``copy``/``mogrify`` whose query is built at run time
    from values: an f-string, ``%`` or ``.format()`` on a str, or ``+`` with something that is
    not a module-level literal — directly or through a local variable. psycopg's
    ``sql.SQL("literal").format(...)`` composition is allowed."""
    tree = ast.parse(source, filename)
    constants = _constant_strings(tree)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []

    def assignments(name: ast.Name) -> list[ast.AST]:
        scope = name
        while scope in parents and not isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef):
            scope = parents[scope]
        return [n.value for n in ast.walk(scope) if isinstance(n, ast.Assign | ast.AnnAssign) and n.value
                is not None and any(isinstance(t, ast.Name) and t.id == name.id
                                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]))]

    def unwrap(node: ast.AST) -> ast.AST:
        while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
            "format", "join", "as_string"
        ) and isinstance(node.func.value, ast.Call):
            node = node.func.value
        return node

    def composition(node: ast.AST) -> bool:
        node = unwrap(node)
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("SQL", "Composed", "Identifier", "Literal"))

    def problem(node: ast.AST, depth: int = 0) -> str | None:
        if depth > 5 or isinstance(node, ast.Constant):
            return None
        if isinstance(node, ast.Name):
            if node.id in constants:
                return None
            for value in assignments(node):  # a local variable: what was assigned to it
                why = problem(value, depth + 1)
                if why:
                    return why
            return None
        if composition(node):
            root = unwrap(node)
            # sql.SQL's own text must be a literal: sql.SQL(f"... {value}") is string-built too.
            if root.func.attr == "SQL" and root.args:
                why = problem(root.args[0], depth + 1)
                return f"sql.SQL over {why}" if why else None
            return None
        if isinstance(node, ast.JoinedStr):
            bad = [ast.unparse(v.value) for v in node.values
                   if isinstance(v, ast.FormattedValue) and not (isinstance(v.value, ast.Name)
                                                                 and v.value.id in constants)]
            return f"f-string interpolating {', '.join(bad)}" if bad else None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
            return "%-formatted string"
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            for side in (node.left, node.right):
                if isinstance(side, ast.Attribute | ast.Call | ast.Subscript) and not composition(side):
                    return f"concatenation with {ast.unparse(side)}"
                if isinstance(side, ast.Name) and side.id not in constants and not assignments(side):
                    return f"concatenation with {side.id}"
            return problem(node.left, depth + 1) or problem(node.right, depth + 1)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
            return "str.format()"
        return None

    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in SQL_METHODS and node.args):
            why = problem(node.args[0])
            if why:
                found.append(f"{filename}:{node.lineno}: {why}")
    return found


def test_no_string_built_sql_anywhere():
    found = [hit for path in python_files()
             for hit in string_built_sql(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == [], "SQL must be parameterised or composed with psycopg.sql:\n" + "\n".join(found)


@pytest.mark.parametrize(("code", "flagged"), [
    ('cur.execute(f"SELECT * FROM t WHERE a = \'{a}\'")', True),
    ('cur.execute("SELECT * FROM t WHERE a = \'%s\'" % a)', True),
    ('cur.execute("SELECT * FROM t WHERE a = {}".format(a))', True),
    ('cur.execute("SELECT * FROM t WHERE a = " + a)', True),
    ('cur.copy(f"COPY (SELECT 1 WHERE s = \'{split}\') TO STDOUT")', True),
    ('cur.execute("SELECT * FROM t WHERE a = %s", (a,))', False),
    ('COLS = "a, b"\ncur.execute(f"SELECT {COLS} FROM t WHERE a = %s", (a,))', False),
    ('Q = "SELECT 1 " + "FROM t"\ncur.execute(Q)', False),
    ('cur.copy(sql.SQL("COPY t WHERE s = {s}").format(s=sql.Literal(split)))', False),
    ('cur.copy(sql.SQL(f"COPY t WHERE s = \'{split}\'"))', True),
    ('def f(cur, split):\n    q = f"COPY t WHERE s = \'{split}\'"\n    cur.copy(q)', True),
    ('def f(cur, split):\n    q = sql.SQL("COPY t WHERE s = {s}").format(s=sql.Literal(split))\n    cur.copy(q)',
     False),
])
def test_the_sql_check_tells_built_from_parameterised(code, flagged):
    assert bool(string_built_sql(code)) is flagged


# -- secrets ------------------------------------------------------------------------------

SECRET_PATTERNS = (
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*['\"][A-Za-z0-9/+]{40}['\"]"),
    re.compile(r"-----BEGIN (RSA |EC |OPENSSH )?PRIVATE KEY-----"),
    re.compile(r"(?i)postgres(ql)?://[^:/\s]+:(?!\{|\$|<|%|\*)[^@\s]{3,}@(?!localhost|127\.0\.0\.1)"),
)


def test_no_secret_in_code_or_config():
    files = python_files() + sorted((ROOT / "plugins").rglob("*.json")) + sorted((ROOT / "deploy").rglob("*.y*ml"))
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)[:40]}" for p in files for pat in SECRET_PATTERNS
            for m in pat.finditer(p.read_text(errors="replace"))]
    assert hits == []


def test_rendered_templates_hold_no_connection_password(monkeypatch):
    """Every templated field of every task, rendered for a run, never names a connection or
    its password: the DAG passes connection ids, and hooks read the secret at run time."""
    import json

    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 3.0.x (MWAA): DagBag still lives in airflow.models
        from airflow.models.dagbag import DagBag

    password = "s3cr3t-Catalogue-Pw"  # noqa: S105 - the value the test looks for
    monkeypatch.setenv("AIRFLOW_CONN_SKU_CATALOGUE", json.dumps(
        {"conn_type": "postgres", "host": "db", "login": "sku", "password": password, "schema": "c", "port": 5432}))
    bag = DagBag(dag_folder=str(ROOT / "dags"), safe_mode=False)
    assert not bag.import_errors
    checked = 0
    for dag in bag.dags.values():
        for task in dag.tasks:
            for field in task.template_fields:
                raw = getattr(task, field, None)
                text = json.dumps(raw, default=str)
                assert password not in text
                assert not re.search(r"\bconn\.|\bvar\.value\.[a-z_]*(password|secret)", text), (task.task_id, field)
                checked += 1
    assert checked > 10


# -- model archives -------------------------------------------------------------------------


def _archive(tmp_path: Path, add) -> Path:
    path = tmp_path / "model.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add(tar)
    return path


def _file(tar: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _link(tar: tarfile.TarFile, name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    tar.addfile(info)


@pytest.mark.parametrize("add", [
    pytest.param(lambda t: _file(t, "../escaped.txt"), id="dot-dot"),
    pytest.param(lambda t: _file(t, "model/../../escaped.txt"), id="nested-dot-dot"),
    pytest.param(lambda t: _link(t, "model.pt", "/etc/passwd"), id="symlink-absolute"),
    pytest.param(lambda t: _link(t, "model.pt", "../../outside"), id="symlink-out"),
    pytest.param(lambda t: (_link(t, "d", ".."), _file(t, "d/escaped.txt")), id="symlink-dir-then-file"),
    pytest.param(lambda t: _link(t, "model.pt", "/etc/passwd", tarfile.LNKTYPE), id="hardlink-out"),
    pytest.param(lambda t: _link(t, "dev", "", tarfile.CHRTYPE), id="device"),
])
def test_unsafe_model_archives_are_refused(tmp_path, add):
    out = tmp_path / "out"
    out.mkdir()
    model = _model_module()
    with pytest.raises(model.UnsafeArchiveError):
        model.extract_model_archive(_archive(tmp_path, add), out)
    assert not (tmp_path / "escaped.txt").exists()


def test_an_absolute_member_lands_inside_the_target(tmp_path):
    """tarfile's ``data`` filter strips the leading '/' (the fallback refuses it): either way
    nothing is written outside ``out``."""
    outside = tmp_path / "abs-escape.txt"
    out = tmp_path / "out"
    model = _model_module()
    try:
        model.extract_model_archive(_archive(tmp_path, lambda t: _file(t, str(outside))), out)
    except model.UnsafeArchiveError:
        pass
    else:
        assert (out / str(outside).lstrip("/")).is_file()
    assert not outside.exists()


def test_a_plain_model_archive_extracts(tmp_path):
    archive = _archive(tmp_path, lambda t: (_file(t, "model.pt", b"weights"), _file(t, "classes.json", b"{}")))
    out = tmp_path / "out"
    _model_module().extract_model_archive(archive, out)
    assert (out / "model.pt").read_bytes() == b"weights" and (out / "classes.json").read_bytes() == b"{}"
