"""Tests that each script reads as a chapter, and that the four chapters agree with each other.

These check the structure a reader relies on (settings first, numbered sections in reading
order with notebook cells, main() as a short table of contents, appendices at the end, helper
copies that are byte-identical, one name per idea) and the lint that CI enforces. Each check
reads the script's source text: nothing is trained here.
"""

import ast
import importlib.util
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

SCRIPTS = {
    "ex1": "example_1_basic_unet/basic_unet_segmentation.py",
    "ex2": "example_2_pretrained_encoders/pretrained_segmentation.py",
    "ex3": "example_3_medical_segmentation/medical_segmentation.py",
    "ex4": "example_4_advanced_techniques/advanced_segmentation.py",
}
SECTION = re.compile(r"^# %% (\d+)\. (.+)$")  # "# %% 3. Loss and metrics": a numbered chapter cell
APPENDIX = re.compile(r"^# %% Appendix: (.+)$")
MAIN_STEP = re.compile(r"^\s*# (\d+)\. ")  # "# 4. Training: ..." in main(): the section it runs
MAX_MAIN_LINES = 50  # main() is a table of contents, not the chapter itself
MAX_FUNCTION_LINES = 50  # a function in the reading path fits on one screen
MAX_EDIT_THESE_LINES = 30  # "Edit these": the knobs a learner turns, not every setting
# The helpers every chapter shares, in the order of its plumbing appendix.
PLUMBING = (
    "pick_device",
    "pick_num_workers",
    "seed_everything",
    "memory_format",
    "autocast",
    "count_parameters",
    "print_eta",
    "save_checkpoint",
    "jsonable",
    "write_json",
)
# One idea, one name: the retired names of ideas that every chapter now calls the same.
RETIRED_NAMES = {
    "train_model": "fit",
    "iou_from_confusion": "metrics_from_confusion",
    "scores_from_confusion": "metrics_from_confusion",
    "predict": "predict_image",
    "plot_curves": "plot_training_curves",
    "colourize": "colorize",
    "CPU_THREADS": "NUM_THREADS",  # a setting: same knob, same name in every chapter
}


def source(key: str) -> str:
    return (REPO_ROOT / SCRIPTS[key]).read_text(encoding="utf-8")


def lines(key: str) -> list[str]:
    return source(key).splitlines()


def top_level_functions(key: str) -> dict[str, ast.AST]:
    tree = ast.parse(source(key))
    return {
        node.name: node
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
    }


def sections(key: str) -> list[tuple[int, str]]:
    """[(number, title)] of the numbered cells, in file order."""
    return [
        (int(match[1]), match[2].strip())
        for match in map(SECTION.match, lines(key))
        if match
    ]


def first_appendix_line(key: str) -> int:
    """1-based line number of the first "# %% Appendix:" cell."""
    for number, line in enumerate(lines(key), start=1):
        if APPENDIX.match(line):
            return number
    raise AssertionError(f"{SCRIPTS[key]} has no '# %% Appendix:' cell")


def plumbing_text(key: str) -> str:
    """The plumbing appendix, from its cell line to the end of write_json."""
    text = source(key)
    start = text.index("# %% Appendix: plumbing")
    end_line = top_level_functions(key)["write_json"].end_lineno
    end = len("\n".join(text.splitlines()[:end_line]))
    assert start < end, f"{SCRIPTS[key]}: write_json must be inside the plumbing appendix"
    return text[start:end]


@pytest.mark.parametrize("key", SCRIPTS)
def test_sections_are_numbered_cells_in_reading_order(key):
    numbers = [number for number, _ in sections(key)]
    assert numbers == list(range(1, len(numbers) + 1)), numbers
    assert len(numbers) >= 6, "data, model, loss and metrics, training, evaluation, figures"


@pytest.mark.parametrize("key", SCRIPTS)
def test_appendices_come_after_every_section_and_plumbing_is_last(key):
    text_lines = lines(key)
    appendix_at = first_appendix_line(key)
    last_section_at = max(i for i, line in enumerate(text_lines, 1) if SECTION.match(line))
    assert last_section_at < appendix_at
    titles = [match[1] for match in map(APPENDIX.match, text_lines) if match]
    assert titles[-1] == "plumbing", titles
    # After the plumbing appendix nothing but the run guard: a notebook that runs the cells in
    # order has defined every function before main() starts.
    tail = [line for line in text_lines[-3:] if line.strip()]
    assert tail == ['if __name__ == "__main__":', "    main()"], tail


def test_the_plumbing_appendix_is_the_same_text_in_every_chapter():
    texts = {key: plumbing_text(key) for key in SCRIPTS}
    reference = texts["ex1"]
    for key, text in texts.items():
        assert text == reference, f"{SCRIPTS[key]}'s plumbing appendix differs from Example 1's"
    functions = top_level_functions("ex1")
    names_in_order = sorted(PLUMBING, key=lambda name: functions[name].lineno)
    assert tuple(names_in_order) == PLUMBING


@pytest.mark.parametrize("name", ["confusion_matrix", "warn_if_collapsed", "load_model"])
def test_helpers_with_the_same_name_are_byte_identical_where_the_code_is_shared(name):
    """A diff between two chapters shows only the new idea, not a reworded helper."""
    copies = {}
    for key in SCRIPTS:
        node = top_level_functions(key).get(name)
        if node is not None:
            copies[key] = ast.get_source_segment(source(key), node)
    if name == "load_model":  # rebuilds a different network class in Example 4
        copies = {key: text for key, text in copies.items() if "UNet(" in text}
    assert len(copies) >= 2, f"{name} is shared by at least two chapters"
    first = next(iter(copies.values()))
    for key, text in copies.items():
        assert text == first, f"{SCRIPTS[key]}: {name} differs from the other chapters' copy"


@pytest.mark.parametrize("key", SCRIPTS)
def test_one_name_per_idea(key):
    settings = {
        target.id
        for node in ast.parse(source(key)).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    functions = top_level_functions(key)
    for retired, name in RETIRED_NAMES.items():
        assert retired not in functions, f"{SCRIPTS[key]}: call {retired} {name}, as elsewhere"
        assert retired not in settings, f"{SCRIPTS[key]}: call {retired} {name}, as elsewhere"
    for name in ("fit", "metrics_from_confusion", "predict_image", "confusion_matrix"):
        assert name in functions, f"{SCRIPTS[key]} has no {name}"


@pytest.mark.parametrize("key", SCRIPTS)
def test_main_is_a_short_table_of_contents_in_section_order(key):
    node = top_level_functions(key)["main"]
    assert node.end_lineno - node.lineno + 1 <= MAX_MAIN_LINES
    body = lines(key)[node.lineno - 1 : node.end_lineno]
    steps = [int(match[1]) for match in map(MAIN_STEP.match, body) if match]
    assert steps == sorted(set(steps)), f"main() runs sections out of order: {steps}"
    numbers = [number for number, _ in sections(key)]
    assert len(steps) >= len(numbers) - 2, "main() names nearly every section it runs"
    assert set(steps) <= set(numbers)


@pytest.mark.parametrize("key", SCRIPTS)
def test_no_function_in_the_reading_path_is_longer_than_a_screen(key):
    tree = ast.parse(source(key))
    appendix_at = first_appendix_line(key)
    too_long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.lineno < appendix_at
        and node.name != "main"
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not too_long, too_long


@pytest.mark.parametrize("key", SCRIPTS)
def test_settings_start_with_the_knobs_a_learner_turns(key):
    text_lines = lines(key)
    starts = [i for i, line in enumerate(text_lines) if line.startswith("# Edit these")]
    ends = [i for i, line in enumerate(text_lines) if line.startswith("# Advanced settings")]
    assert len(starts) == 1 and len(ends) == 1
    assert 0 < ends[0] - starts[0] <= MAX_EDIT_THESE_LINES + 1
    assert text_lines[starts[0] - 2] == "# %% Settings"
    first_section = next(i for i, line in enumerate(text_lines) if SECTION.match(line))
    assert ends[0] < first_section, "all settings sit at the top, before section 1"


@pytest.mark.parametrize("key", SCRIPTS)
def test_hardware_anecdotes_stay_out_of_the_code(key):
    """Timings and hardware notes belong in benchmarks/README.md, not in teaching comments."""
    tree = ast.parse(source(key))
    code_lines = lines(key)[tree.body[0].end_lineno :]  # everything after the module docstring
    for word in ("H200", "GFLOP", "A100", "threads took", " ms with "):
        hits = [line.strip() for line in code_lines if word in line]
        assert not hits, f"{SCRIPTS[key]} mentions {word!r} in code: {hits[:2]}"


@pytest.mark.parametrize("key", SCRIPTS)
def test_readme_contents_follow_the_sections_and_end_with_summary_and_exercises(key):
    readme = (REPO_ROOT / SCRIPTS[key]).parent / "README.md"
    text = readme.read_text(encoding="utf-8")
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Contents"
    assert headings[-2:] == ["## Summary", "## Exercises"]
    contents = text.split("## Contents", 1)[1].split("\n## ", 1)[0]
    for number, title in sections(key):
        assert f"{number}. {title}" in contents, f"Contents lacks '{number}. {title}'"


def test_code_passes_the_linter():
    """ruff with the repository's pyproject.toml: lines <= 100, imports sorted, pyflakes."""
    ruff = shutil.which("ruff")
    if ruff is None and importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed: pip install -r requirements.txt")
    command = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    result = subprocess.run(
        [*command, "check", "--no-cache", "."],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


def notebook_cells(key: str) -> list[str]:
    """The script split where jupytext, VS Code and Spyder split it: at each "# %%" line."""
    cells, current = [], []
    for line in lines(key):
        if line.startswith("# %%") and current:
            cells.append("\n".join(current))
            current = []
        current.append(line)
    cells.append("\n".join(current))
    return cells


@pytest.fixture
def notebook_kernel(monkeypatch, tmp_path):
    """A stand-in for a Jupyter kernel: no __file__, the kernel's own options in sys.argv."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "ipykernel", sys.modules.get("ipykernel", object()))
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "kernel-1234.json"])
    return tmp_path


@pytest.mark.parametrize("key", SCRIPTS)
def test_every_cell_runs_in_order_in_a_notebook_without_file(key, notebook_kernel):
    namespace = {"__name__": "notebook"}  # not "__main__": define everything, train nothing
    for cell in notebook_cells(key):
        exec(compile(cell, SCRIPTS[key], "exec"), namespace)
    assert namespace["HERE"] == notebook_kernel  # no __file__: files go beside the notebook
    assert callable(namespace["main"])


def test_a_notebook_that_runs_every_cell_trains_example_1(notebook_kernel):
    """The last cell starts main(), which must ignore the kernel's command line."""
    namespace = {"__name__": "__main__"}
    cells = notebook_cells("ex1")
    assert cells[1].startswith("# %% Settings")
    for number, cell in enumerate(cells):
        exec(compile(cell, SCRIPTS["ex1"], "exec"), namespace)
        if number == 1:  # the learner edits the settings cell: here, to the --quick sizes
            namespace.update(namespace["QUICK"], EPOCHS=1)
    metrics = (notebook_kernel / "outputs" / "metrics.json").read_text()
    assert '"epochs_run": 1' in metrics
