"""The shape of the codebase: the import graph of the top-level modules, read from their source
(imports inside functions included), has no cycle."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_graph(root: str = ROOT) -> dict:
    """{module: set of the top-level modules it imports} for every *.py in `root`."""
    modules = {name[:-3] for name in os.listdir(root) if name.endswith(".py")}
    graph = {}
    for module in modules:
        with open(os.path.join(root, module + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        graph[module] = names & modules - {module}
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
    ("storage", {"storage"}),
    ("math", {"attention", "model", "generate"}),
    ("parallelism", {"sharding", "serving"}),
    ("configuration", {"config"}),
    ("file formats", {"tensorfile", "tokenizer", "hf", "checkpoint"}),
    ("data", {"records", "chat", "demo", "data", "weights"}),
    ("the loop", {"recovery", "tracking", "trainer"}),
    ("evaluation", {"humaneval"}),
    ("entry points", {"train", "sft", "sample", "convert", "aot", "plot", "ablate", "eval"}),
]


def layering_errors(graph: dict) -> list[str]:
    level = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}
    errors = [f"{m}.py belongs to no layer of tests/test_layout.py" for m in sorted(graph) if m not in level]
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
    assert layering_errors({"model": {"trainer"}, "trainer": set(), "scratch": set()}) == [
        "scratch.py belongs to no layer of tests/test_layout.py", "model (math) imports trainer (the loop)"]
