"""The ``pyro-moe`` command line: the demo, and the experiments on any HF MoE checkpoint and MCQA data.

Commands (``pyro-moe COMMAND --help`` lists the options of each):

* ``demo``: the offline demo on the embedded benchmark (:mod:`pyro_moe.experiments.demo`);
* ``stability``: routing stability under router-input noise and the susceptible layers;
* ``fit``: fit a guide family (SVI, or post-hoc for the Laplace families) and save the posterior;
  on MCQA questions (``--data``) or plain text (``--text``: one document per line, the next-token
  likelihood); or run a recipe by name on MCQA questions (``--recipe``: starting scale chosen on
  calibration questions, iwae with learned prior scales, a temperature per predictive mode;
  :mod:`pyro_moe.inference.recipes`);
* ``laplace``: ``fit`` with a Laplace family (``laplace``, ``kron-laplace``, ``expert-laplace``);
* ``evaluate``: calibration (and OoD detection with ``--ood-data``) of a saved posterior or of guide
  families fitted on the spot, against the deterministic model and temperature scaling; with
  ``--text``, the held-out perplexity of a saved posterior and of the deterministic model;
* ``diagnose``: ArviZ ``InferenceData`` (netCDF), ``az.summary`` and the collapse report of a saved posterior;
* ``compare``: calibration and OoD of several guide families side by side;
* ``bench``: latency, peak memory and FLOPs of the families' predictions;
* ``lm-eval``: lm-evaluation-harness tasks (``--tasks``, local ones with ``--include-path``) under a saved
  posterior, with the harness's results and pyro-moe's NLL, ECE, Brier, mutual information (and OoD AUROC
  with ``--ood-tasks``) of the multiple-choice tasks (needs ``pyro-moe[lm-eval]``);
* ``generate``: text after prompts with per-token predictive entropy and mutual information, under a saved
  posterior or the prior of ``--sites``: the uncertain tokens marked on the terminal, ``generations.jsonl``,
  ``generations.html`` (tokens shaded by mutual information) and ``generations.png``.

Without ``--model`` the embedded benchmark model is used, without ``--data`` its splits. A model is
loaded with ``AutoModelForCausalLM.from_pretrained`` (a local folder, or an HF id, downloaded as
transformers does when there is a network), remote code only with ``--trust-remote-code``.
Bad input ends with exit code 2 and a one-line reason, before anything but ``pyro-moe.log`` is
written into ``--out`` (a folder: an existing file there is refused). Every command locks ``--out``
first (:mod:`pyro_moe.run_lock`): a second command writing into the same folder is refused with exit
code 2 naming the first one's PID and command. ``evaluate`` and ``diagnose`` refuse a ``--posterior``
fitted on another model unless ``--allow-other-model`` (:mod:`pyro_moe.inference.checkpoint`). Data
rows that are skipped (broken lines, rows that fit no schema) are named by file line in a warning on
stderr and in the log.

``fit`` and ``laplace`` run data-parallel when a launcher starts several processes (torchrun,
accelerate launch; see :mod:`pyro_moe.distributed`): rank 0 writes the log, the posterior and the
summary. A process that died or stopped answering ends the others with exit code 1 within
``--timeout`` seconds.

    torchrun --nproc_per_node=4 -m pyro_moe fit --model path/to/moe --data train.jsonl --device cuda --out runs/fit

    pyro-moe fit --model path/to/moe --data train.jsonl --guide mfvr --layers susceptible --out runs/fit
    pyro-moe fit --model path/to/moe --data train.jsonl --calibration-data calib.jsonl --recipe mfvr-iwae-layer \
        --scale 0.75 --out runs/recipe
    python -m pyro_moe evaluate --model path/to/moe --posterior runs/fit/posterior --data test.jsonl --out runs/eval
    pyro-moe fit --model path/to/moe --text train.txt --guide mfvr --sites logits --out runs/text-fit
    pyro-moe evaluate --model path/to/moe --text held_out.txt --posterior runs/text-fit/posterior --out runs/text-eval

The package: :mod:`~pyro_moe.cli.parser` (the parser), :mod:`~pyro_moe.cli.options` (the option groups several
commands share), :mod:`~pyro_moe.cli.settings` (those options as frozen dataclasses, built once at a command's
entry), :mod:`~pyro_moe.cli.inputs` (model and data loading with their checks), :mod:`~pyro_moe.cli.posterior`
(sites, layers and guides fitted by name), one module per command (its options, settings and runner), and
:mod:`~pyro_moe.cli.entry` (:func:`main`: the run folder's lock and log, errors to exit codes).
"""

from pyro_moe.cli.entry import DATA_PARALLEL_COMMANDS, LOG_NAME, main
from pyro_moe.cli.errors import EXIT_BAD_INPUT, EXIT_DISTRIBUTED, EXIT_INTERRUPTED, BadInput
from pyro_moe.cli.fit import CHECKPOINT_MINUTES, CHECKPOINT_NAME, CHECKPOINT_STEPS
from pyro_moe.cli.inputs import available_devices
from pyro_moe.cli.parser import build_parser

__all__ = [
    "CHECKPOINT_MINUTES",
    "CHECKPOINT_NAME",
    "CHECKPOINT_STEPS",
    "DATA_PARALLEL_COMMANDS",
    "EXIT_BAD_INPUT",
    "EXIT_DISTRIBUTED",
    "EXIT_INTERRUPTED",
    "LOG_NAME",
    "BadInput",
    "available_devices",
    "build_parser",
    "main",
]
