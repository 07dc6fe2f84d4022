PY ?= python3

# The README's main command: a random-weight demo of the whole pipeline.
demo:
	$(PY) -m pip install -q -e . && $(PY) -m minisd demo

# The README's test command. torch is pinned (constraints.txt) to the local CPU wheel; pytest's
# exit code 5 ("no tests collected") is turned into a failure so a run can never pass vacuously.
test:
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0 -e ".[test]"
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

.PHONY: demo test
