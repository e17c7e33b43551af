# Thin wrappers: the logic is in scripts/ and the package.
.PHONY: demo test bench clean
demo:
	scripts/demo.sh
test:
	scripts/test.sh
clean:
	rm -rf .venv build *.egg-info .pytest_cache
