# Thin wrappers: the logic is in scripts/ and the package.
.PHONY: demo test bench clean
demo:
	scripts/demo.sh
test:
	scripts/test.sh
bench:
	scripts/bootstrap.sh && .venv/bin/noderedirect bench enroll
clean:
	rm -rf .venv build *.egg-info .pytest_cache
