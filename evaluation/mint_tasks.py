"""MINT's tasks: loading them from a MINT checkout, the first message, and each subset's success rule.

    from evaluation import mint_tasks
    tasks = mint_tasks.load(MINT_DIR, "gsm8k")        # MINT's data/processed/gsm8k/test_prompts.json
    mint_tasks.first_message(tasks[0], max_steps=5, max_propose=2)
    mint_tasks.check(tasks[0], "6")                   # Checked(success=True, error=None)

Used by evaluation/mint_env.py (the episode) and `python -m evaluation.agent`. The rules are those of
MINT at commit 856af63 (github.com/xingyaoww/mint-bench, `mint/tasks/`), the version that recorded
Lemur-70B-Chat's runs; docs/agents.md lists them with their quirks, which are kept on purpose
(a negative reference number never matches; multiple choice looks for "a)" alone; TheoremQA's
answer is Python evaluated without `math`). Where MINT's rule raises, `error` holds the message
MINT would show instead of "Your answer is wrong.".

Trade-offs: a checker that evaluates model text runs confined (evaluation/sandbox.py): code
solutions with their tests, and a TheoremQA answer that is not a plain literal, whose whole rule
then runs in the sandbox and passes only if the answer is right. A literal (most answers) is read
with `ast.literal_eval` here, which gives what `eval` would without running anything.
"""
import ast
import dataclasses
import inspect
import json
import os
import re
import textwrap

from evaluation import sandbox

# subset -> (MINT's task type folder, the rule that checks a solution)
SUBSETS = {"gsm8k": ("reasoning", "number"), "hotpotqa": ("reasoning", "number"), "math": ("reasoning", "number"),
           "mmlu": ("reasoning", "choice"), "theoremqa": ("reasoning", "theoremqa"),
           "humaneval": ("code_generation", "code"), "mbpp": ("code_generation", "code")}
CODE_TIMEOUT = 10.0  # MINT's check_correctness limit, wall clock
WIKIPEDIA_DESCRIPTION = ("[1] wikipedia_search(query: str) -> str\nThe Wikipedia Search tool provides access to a "
                         "vast collection of articles covering a wide range of topics.\nCan query specific keywords "
                         "or topics to retrieve accurate and comprehensive information.\n\n")  # sic: two
TOOLS_HEADER = "Tool function available (already imported in <execute> environment):\n"
THEOREMQA_PREFIX = "Answer the following question with a number, a list of numbers or True or False. "


@dataclasses.dataclass(frozen=True)
class Task:
    """One task as MINT's environment sees it: `prompt` as shown to the model (after MINT's per-subset
    rewriting), `reference` as the rule compares it, and the texts the first message is built from."""
    subset: str
    id: object
    prompt: str
    reference: object
    template: str  # MINT's template_with_tool.txt
    example: str  # the in-context example (with_tool.txt of the subset's folder)
    options: dict | None = None  # multiple choice: {letter: text}
    answer_type: str | None = None  # TheoremQA

    @property
    def kind(self) -> str:
        return SUBSETS[self.subset][0]

    @property
    def rule(self) -> str:
        return SUBSETS[self.subset][1]

    @property
    def tools(self) -> tuple:
        """The tool functions MINT puts in the shell: wikipedia_search for every reasoning subset."""
        return ("wikipedia_search",) if self.kind == "reasoning" else ()

    def to_dict(self) -> dict:
        """The "task" object of MINT's results.jsonl."""
        name = self.subset if self.kind == "code_generation" else "reasoning"
        return {"task_name": name, "task_id": self.id, "prompt": self.prompt, "reference": self.reference,
                "metadata": {"options": self.options} if self.options is not None else {}}


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def make_task(subset: str, row: dict, template: str, example: str) -> Task:
    """A Task from one row of MINT's test_prompts.json, rewritten as MINT's task class for `subset` does."""
    rule, prompt, reference = SUBSETS[subset][1], row["prompt"], row["reference"]
    if subset == "humaneval":
        return Task(subset, row["id"], "Complete the following code:\n\n" + prompt, reference, template, example)
    if subset == "mbpp":
        return Task(subset, row["id"], prompt.replace('"""', "").strip(), reference, template, example)
    if rule == "choice":
        return Task(subset, row["id"], prompt, reference.strip().lower(), template, example,
                    options=choice_options(prompt))
    if rule == "theoremqa":
        return Task(subset, row["id"], THEOREMQA_PREFIX + prompt.strip(), reference, template, example,
                    answer_type=row.get("answer_type"))
    return Task(subset, row["id"], prompt.strip(), str(reference).strip().lower(), template, example)


def load(mint_dir: str, subset: str) -> list:
    """The tasks of `subset` from a MINT checkout (or any folder in its layout)."""
    kind = SUBSETS[subset][0]
    template = _read(os.path.join(mint_dir, "mint", "prompt", "templates", "template_with_tool.txt"))
    folder = "reasoning" if kind == "reasoning" else subset
    example = _read(os.path.join(mint_dir, "mint", "tasks", "in_context_examples", folder, "with_tool.txt"))
    with open(os.path.join(mint_dir, "data", "processed", subset, "test_prompts.json"), encoding="utf-8") as f:
        return [make_task(subset, json.loads(line), template, example) for line in f if line.strip()]


def first_message(task: Task, max_steps: int, max_propose: int) -> str:
    """The first user message: MINT's template filled with the budget, the tools, the example, the task."""
    tool_desc = TOOLS_HEADER + WIKIPEDIA_DESCRIPTION if task.tools else ""
    return task.template.format(max_total_steps=max_steps, max_propose_solution=max_propose, tool_desc=tool_desc,
                                in_context_example=task.example, task_prompt="Task:\n" + task.prompt)


@dataclasses.dataclass(frozen=True)
class Checked:
    """success: the rule accepts the solution. error: where MINT's rule raises, the message MINT shows
    as the observation instead of "Your answer is wrong." (always with success False)."""
    success: bool
    error: str | None = None


def check(task: Task, solution: str, level: str | None = None) -> Checked:
    """Whether `solution` (the text inside <solution> tags) solves `task`, by the subset's rule."""
    try:
        if task.rule == "code":
            verdict = sandbox.run_program(f"exec({solution + chr(10) + task.reference!r}, {{}})", CODE_TIMEOUT,
                                          level=level)
            return Checked(verdict.passed)  # exec in a dict of its own, as MINT's: __name__ is not "__main__"
        if task.rule == "number":
            return Checked(number_matches(task.reference, solution.lower().strip()))
        if task.rule == "choice":
            return Checked(choice_matches(task.reference, task.options, solution))
        return theoremqa_check(task, solution, level)
    except Exception as e:
        return Checked(False, f"{type(e).__name__}: {e}")


# ---- gsm8k, hotpotqa, math: MINT's ReasoningTask

def number_matches(reference: str, answer: str) -> bool:
    """Both numbers: within 5% of the reference (so a negative reference never matches, as in MINT);
    otherwise the reference is a substring of the answer."""
    try:
        ref, got = float(reference), float(answer)
    except ValueError:
        return reference in answer
    return abs(ref - got) <= 0.05 * ref


# ---- mmlu: MINT's MultipleChoiceTask

def choice_options(prompt: str) -> dict:
    """{letter: option text} from "Options: A ) x , B ) y , ..." at the prompt's end."""
    options = {}
    for part in prompt.split("Options: ")[-1].split(" , "):
        pieces = part.strip("[]' ").split(")")
        text = pieces[1].lower().strip(".").replace(". Which option is correct?", "")
        options[pieces[0].lower().strip()] = text.replace(". Which one is correct?", "").strip()
    return options


def _choice_equal(reference: str, answer: str) -> bool:
    if reference.isdigit() and answer.isdigit():
        return abs(float(reference) - float(answer)) <= 0.05 * float(reference)
    return reference in answer


def choice_matches(reference: str, options: dict, solution: str) -> bool:
    """MINT's rule: the answer is "a" if it contains "a)" or "a )" (MINT looks for that letter only),
    else the whole lowered answer; it matches if it contains the reference letter, or else if it
    contains the right option's text and no other option's text."""
    answer = solution.lower().strip()
    if "a)" in answer or "a )" in answer:
        answer = "a"
    if _choice_equal(reference, answer):
        return True
    correct = options[reference]  # a KeyError is MINT's too
    wrong = list(options.values())
    i = 0  # MINT removes from the list while iterating it: an option right after a removed one is skipped
    while i < len(wrong):
        if wrong[i] in correct:
            wrong.remove(wrong[i])
        i += 1
    if any(_choice_equal(option, answer) or option in answer for option in wrong):
        return False
    return _choice_equal(correct, answer) or correct in answer


# ---- theoremqa: MINT's TheoremqaTask (after TheoremQA's own predict_accuracy.py)

NUMBER = r"[-+]?(?:[\d,]*\.*\d+)"


def theoremqa_text(prediction: str) -> str:
    """The answer text rewritten as MINT rewrites it before evaluating it as Python."""
    if "=" in prediction:
        prediction = prediction.split("=")[-1].strip()
    if "≈" in prediction:
        prediction = prediction.split("≈")[-1].strip()
    for mark in ("`", "$", "°"):
        prediction = prediction.replace(mark, "")
    if prediction in ("true", "yes", "false", "no"):
        prediction = "True" if prediction in ("true", "yes") else "False"
    if "True" in prediction or "False" in prediction:
        prediction = "True" if "True" in prediction else "False"
    if "approximately" in prediction:
        prediction = prediction.replace("approximately", "").strip()
    if " or " in prediction:
        prediction = prediction.split(" or ")[0]
    # units dropped before or after the number
    for pattern in (rf"({NUMBER}) [^0-9 ]+$", rf"[^0-9 ]+ ({NUMBER})$", rf"({NUMBER})[^\d]{{1,2}}$"):
        if re.match(pattern, prediction):
            prediction = re.search(pattern, prediction).group(1)
    if re.match(r"[^-+\d]{1,2}(?:[\d,]*\.*\d+)$", prediction):
        prediction = re.search(r"[^-+\d]{1,2}((?:[\d,]*\.*\d+))$", prediction).group(1)
    if "10^" in prediction:
        prediction = re.sub(r"10\^(-?\d+)", r"math.pow(10, \1)", prediction)
    prediction = prediction.replace(" x ", "*").replace(" × ", "*")
    if re.match(r"^[-+]?(\d{1,3}(,\d{3})*|(\d+))(\.\d+)?$", prediction):
        prediction = prediction.replace(",", "")
    for letter in "abcd":
        if f"{letter})" in prediction or f"{letter} )" in prediction:
            prediction = f"({letter})"
    if option := re.search(r"\([a-d]\)", prediction):
        prediction = f'"{option.group(0)}"'
    return prediction or "0"


# The part of the rule that runs on the evaluated answer; also shipped as source into the sandbox when
# the answer is not a literal (so these functions use only builtins and their arguments).

def theoremqa_value(prediction, rational=None, ndarray=None):
    """MINT's type conversion of the evaluated answer (sets and tuples to lists, complex to real,
    sympy Rationals to floats, numpy arrays to lists)."""
    if isinstance(prediction, (set, tuple)):
        prediction = list(prediction)
        if isinstance(prediction[0], complex):  # an empty tuple raises here, in MINT too
            prediction = [x.real for x in prediction]
        elif rational is not None and isinstance(prediction[0], rational):
            prediction = [float(x) for x in prediction]
    elif ndarray is not None and isinstance(prediction, ndarray):
        prediction = prediction.tolist()
    elif isinstance(prediction, complex):
        prediction = prediction.real
    elif rational is not None and isinstance(prediction, rational):
        prediction = float(prediction)
    return prediction


def theoremqa_correct(prediction, reference, answer_type) -> bool:
    """The comparison: exact for bool and option answers, 4% relative for a float reference, rounding
    for an integer one, element by element after sorting for lists."""
    def number(p, gt):
        if not isinstance(p, (int, float)):  # bool is an int here, as in MINT
            if isinstance(p, (list, str, tuple, complex, dict)):
                return False
            raise ValueError(p)
        if isinstance(gt, float):
            return gt - abs(gt) * 0.04 <= p <= gt + abs(gt) * 0.04
        return round(p) == gt

    if not isinstance(prediction, (str, int, float, list)):
        return False
    if answer_type in ("bool", "option", "Option"):
        return prediction == reference
    if answer_type in ("integer", "float"):
        return number(prediction, reference)
    if answer_type in ("list of integer", "list of float"):
        if not isinstance(prediction, list) or len(prediction) != len(reference):
            return False
        if any(not isinstance(x, (int, float)) for x in prediction):
            return False
        return all(number(p, g) for p, g in zip(sorted(prediction), sorted(reference)))
    raise ValueError(f"no rule for the answer type {answer_type!r}")  # MINT fails here too


THEOREMQA_PROGRAM = """
import ast, logging, re, sys, traceback
{functions}
names = {{"re": re, "ast": ast, "logging": logging, "traceback": traceback}}
if "np" in {text!r}:
    import numpy
    names["np"] = numpy
if "Rational" in {text!r}:
    from sympy import Rational
    names["Rational"] = Rational
try:
    prediction = eval({text!r}, names)
except Exception:
    raise SystemExit("not an answer")
numpy, sympy = sys.modules.get("numpy"), sys.modules.get("sympy")
prediction = theoremqa_value(prediction, sympy and sympy.Rational, numpy and numpy.ndarray)
if not theoremqa_correct(prediction, {reference!r}, {answer_type!r}):
    raise SystemExit("wrong")
"""


def theoremqa_check(task: Task, solution: str, level: str | None = None) -> Checked:
    """A literal answer is checked here; any other is evaluated and checked in the sandbox (MINT evaluates
    it in its own module, where numpy is `np`, sympy's `Rational` is there and `math` is not)."""
    text = theoremqa_text(solution)
    try:
        prediction = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        functions = "\n".join(textwrap.dedent(inspect.getsource(f)) for f in (theoremqa_value, theoremqa_correct))
        program = THEOREMQA_PROGRAM.format(functions=functions, text=text, reference=task.reference,
                                           answer_type=task.answer_type)
        verdict = sandbox.run_program(program, CODE_TIMEOUT, level=level)
        error = None
        if not verdict.passed and not verdict.result.endswith(("SystemExit: wrong", "SystemExit: not an answer")):
            error = verdict.result.removeprefix("failed: ")
        return Checked(verdict.passed, error)
    return Checked(theoremqa_correct(theoremqa_value(prediction), task.reference, task.answer_type))
