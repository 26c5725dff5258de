"""The shape of the codebase: the import graph of the modules at the top level and in its folders
(formats/, evaluation/, tools/, kernels/), read from their source (imports inside functions
included), has no cycle and no upward import."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FOLDERS = ("formats", "evaluation", "tools", "kernels")


def modules_of(root: str = ROOT) -> dict:
    """{dotted module name: its file} of every *.py at the top level and in FOLDERS."""
    found = {name[:-3]: os.path.join(root, name) for name in os.listdir(root) if name.endswith(".py")}
    for folder in FOLDERS:
        for name in os.listdir(os.path.join(root, folder)) if os.path.isdir(os.path.join(root, folder)) else ():
            if name.endswith(".py") and name != "__init__.py":
                found[f"{folder}.{name[:-3]}"] = os.path.join(root, folder, name)
    return found


def import_graph(root: str = ROOT) -> dict:
    """{module: set of the project's modules it imports} (`from formats import storage` imports
    formats.storage)."""
    files = modules_of(root)
    graph = {}
    for module, path in files.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[module] = names & set(files) - {module}
    return graph


def find_cycle(graph: dict):
    """One cycle as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The layers, lowest first. A module imports only modules of its own layer or of lower ones, so an
# entry point is never imported by the code below it and the math never by the formats.
LAYERS = [
    ("storage", {"formats.storage"}),
    ("math", {"kernels.flash", "kernels.splash", "kernels.cudnn", "attention", "model"}),
    ("parallelism", {"sharding", "decode"}),
    ("configuration", {"config"}),
    ("files", {"formats.tensorfile", "formats.tokenizer", "formats.hf", "formats.checkpoint", "formats.readers",
               "formats.demo", "formats.weights", "formats.tracking"}),
    ("data", {"data", "chat"}),
    ("the loop", {"train"}),
    ("evaluation", {"evaluation.sandbox_child", "evaluation.sandbox", "evaluation.humaneval", "evaluation.mint_tasks",
                    "evaluation.mint_env", "evaluation.mint_replay", "evaluation.openai_api"}),
    ("commands", {"sft", "sample", "evaluation.harness", "evaluation.agent", "evaluation.server", "tools.aot",
                  "tools.convert", "tools.plot", "tools.ablate", "tools.campaign"}),
]


def layering_errors(graph: dict) -> list[str]:
    level = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}
    errors = [f"{m} belongs to no layer of tests/test_layout.py" for m in sorted(graph) if m not in level]
    for module, imported in sorted(graph.items()):
        for other in sorted(imported):
            if module in level and other in level and level[other] > level[module]:
                errors.append(f"{module} ({LAYERS[level[module]][0]}) imports {other} ({LAYERS[level[other]][0]})")
    return errors


def test_modules_import_only_their_layer_and_below():
    assert layering_errors(import_graph()) == []


def test_the_checks_can_fail():
    """A cycle and an upward import, on a made-up graph, are both found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layering_errors({"model": {"train"}, "train": set(), "tools.scratch": set()}) == [
        "tools.scratch belongs to no layer of tests/test_layout.py", "model (math) imports train (the loop)"]


def test_the_graph_sees_the_folders():
    """Imports into and out of the folders are edges of the graph (both spellings of an import)."""
    graph = import_graph()
    assert "formats.storage" in graph["formats.checkpoint"] and "formats.tokenizer" in graph["formats.checkpoint"]
    assert "train" in graph["sft"] and "decode" in graph["evaluation.harness"]
