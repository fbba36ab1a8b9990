"""The tasks train.py can run (run.task), by name. gpt/tasks/base.py says what a task is.

Adding a task: one file beside these, and one entry here. The config gets the
task's own [section] from its Settings class (gpt/config.py reads this registry).
"""

from gpt.tasks.base import Task
from gpt.tasks.classify import Classification
from gpt.tasks.gpt1 import Entailment, MultipleChoice, Similarity
from gpt.tasks.lm import LanguageModeling

TASKS: dict[str, type[Task]] = {
    "lm": LanguageModeling,  # next-token prediction on a prepared corpus
    "classify": Classification,  # fine-tuning on labelled text
    "entailment": Entailment,  # GPT-1's input transformations (gpt/tasks/gpt1.py): premise $ hypothesis
    "similarity": Similarity,  # both orders of a pair, states added
    "multiple_choice": MultipleChoice,  # one sequence per answer, a softmax across them
}
