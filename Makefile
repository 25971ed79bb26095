# sshlog: build the zipapp, prepare a test machine, run the tests.
#
#   make              build sshlog.pyz (reproducible; offline once build/dl is filled)
#   sudo make deps    install what the agent and the tests need (Debian 12)
#   sudo make test    deps, sshlog.pyz, unit tier under Python 3.9, whole suite as root
#   make test-unit    unit tier only (no root)
#   sudo make test-root   root tier only
#   sudo make bench   the benchmark (tests/bench.py; BENCH_ARGS=--quick for a short run)
#   make readme       regenerate README's configuration reference from the schemas
#   sudo make run     deps, sshlog.pyz, then the daemon in the foreground
#   make clean        remove build outputs (keeps the download cache); distclean: all of build/

PYZ               ?= sshlog.pyz
PYTHON            ?= python3
PYTHON_SHEBANG    ?= /usr/bin/python3
SOURCE_DATE_EPOCH ?= 946684800
BUILD             ?= build
DL_DIR            ?= $(BUILD)/dl
VENDOR            := $(BUILD)/vendor
STAGE             := $(BUILD)/stage

# Vendored pure-Python packages: released copies, pinned by version and hash, shipped
# unmodified with their licences.  The cp311 manylinux wheel of PyYAML is always fetched
# (whatever the build interpreter or host) so that every builder vendors the same bytes;
# its C extension (_yaml/, *.so, PyYAML.libs/) is deleted.
PYYAML_VERSION  := 6.0.2
PYTE_VERSION    := 0.8.2
WCWIDTH_VERSION := 0.2.14
define VENDOR_REQUIREMENTS
pyyaml==$(PYYAML_VERSION) --hash=sha256:3ad2a3decf9aaba3d29c8f537ac4b243e36bef957511b4766cb0057d32b0be85
pyte==$(PYTE_VERSION) --hash=sha256:85db42a35798a5aafa96ac4d8da78b090b2c933248819157fc0e6f78876a0135
wcwidth==$(WCWIDTH_VERSION) --hash=sha256:a7bb560c8aee30f9957e5f9895805edd20602f2d7f720186dfd906e82b4982e1
endef
export VENDOR_REQUIREMENTS
# package directory:distribution name, for moving each LICENSE next to its package
VENDOR_LICENSES := yaml:PyYAML pyte:pyte wcwidth:wcwidth
WHEEL_TAGS := --only-binary=:all: --platform manylinux2014_x86_64 --implementation cp \
              --python-version 3.11 --abi cp311
DL_STAMP     := $(DL_DIR)/.pyyaml-$(PYYAML_VERSION)_pyte-$(PYTE_VERSION)_wcwidth-$(WCWIDTH_VERSION)
VENDOR_STAMP := $(VENDOR)/.vendored

# Tests.  PY39: the oldest Python sshlog.py supports (RHEL 9); PY311: pyenv's 3.11 (gets
# pytest too); PYTEST_PY: the distro python that sees bcc, runs the whole suite.
PY39      ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.9.18/bin/python3) \
                         $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.9.*/bin/python3))) \
                         $(wildcard /usr/local/bin/python3.9 /usr/bin/python3.9))
PY311     ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.11.7/bin/python3) \
                         $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.11.*/bin/python3))))
PYTEST_PY ?= /usr/bin/python3
PYTEST_ARGS ?=
UNIT_TESTS  = $(wildcard tests/unit) tests/test_pyz.py
ROOT_TESTS  = $(or $(wildcard tests/root tests/integration),tests/root)
# The vendored yaml/pyte/wcwidth (exactly what the zipapp ships) and the tree itself are
# importable in every test run: pyenv pythons have no PyYAML of their own.
TEST_ENV    = PYTHONPATH=$(CURDIR):$(CURDIR)/$(VENDOR)$(if $(PYTHONPATH),:$(PYTHONPATH))

DEB_ARCH := $(or $(shell dpkg --print-architecture 2>/dev/null),amd64)
DEPS_PKGS := python3-bpfcc bpfcc-tools bpftool linux-headers-$(DEB_ARCH) \
             openssh-server openssh-client sshpass python3-pytest python3-hypothesis \
             python3-yaml python3-pip rsyslog asciinema debootstrap tmux sudo \
             rsyslog-gnutls python3-aiosmtpd

PYZ_SOURCES := sshlog.py $(wildcard bpf_probes.c) \
               $(if $(wildcard conf.d samples),$(shell find $(wildcard conf.d samples) \
                    \( -name '.*' -o -name __pycache__ \) -prune -o -print))
PYZ_RUN := $(if $(filter /%,$(PYZ)),$(PYZ),./$(PYZ))

export TZ := UTC
export SOURCE_DATE_EPOCH

.DEFAULT_GOAL := all
.DELETE_ON_ERROR:
.NOTPARALLEL:
.PHONY: all vendor pyz deps test test-unit test-root bench run clean distclean readme

all: $(PYZ)
pyz: $(PYZ)
vendor: $(VENDOR_STAMP)

# ---------------------------------------------------------------------------------- build

$(DL_STAMP):
	@mkdir -p $(DL_DIR)
	@printf '%s\n' "$$VENDOR_REQUIREMENTS" > $(DL_DIR)/requirements.txt
	PIP_ROOT_USER_ACTION=ignore $(PYTHON) -m pip download -q --no-deps --require-hashes $(WHEEL_TAGS) \
	    -d $(DL_DIR) -r $(DL_DIR)/requirements.txt
	@touch $@

$(VENDOR_STAMP): $(DL_STAMP) Makefile
	@rm -rf $(VENDOR) && mkdir -p $(VENDOR)
	@printf '%s\n' "$$VENDOR_REQUIREMENTS" > $(DL_DIR)/requirements.txt
	PIP_ROOT_USER_ACTION=ignore $(PYTHON) -m pip install -q --no-deps --no-compile --require-hashes --no-index \
	    --find-links $(DL_DIR) $(WHEEL_TAGS) --target $(VENDOR) -r $(DL_DIR)/requirements.txt
	@cd $(VENDOR) && for pair in $(VENDOR_LICENSES); do \
	    pkg=$${pair%%:*}; dist=$${pair#*:}; \
	    lic=$$(find $$dist-*.dist-info -type f -name 'LICENSE*' | LC_ALL=C sort | head -n 1); \
	    if [ -z "$$lic" ]; then echo "vendor: no LICENSE in $$dist-*.dist-info" >&2; exit 1; fi; \
	    cp "$$lic" "$$pkg/LICENSE"; \
	done
	@cd $(VENDOR) && rm -rf _yaml *.dist-info *.libs bin && \
	    find . -name __pycache__ -prune -exec rm -rf {} + && \
	    find . \( -name '*.so' -o -name '*.pyc' \) -delete
	@touch $@

# Writes the zipapp itself (zipapp iterates rglob unsorted): sorted entries, fixed
# date_time and permissions, no extra fields.  argv: stage shebang epoch output
define PYZ_WRITER
import os, sys, time, zipfile
stage, shebang, epoch, out = sys.argv[1:5]
date_time = max(time.gmtime(int(epoch))[:6], (1980, 1, 1, 0, 0, 0))
names = []
for root, dirs, files in os.walk(stage):
    rel = os.path.relpath(root, stage).replace(os.sep, '/')
    prefix = '' if rel == '.' else rel + '/'
    names += [prefix + d + '/' for d in dirs]
    names += [prefix + f for f in files]
with open(out, 'wb') as fh:
    fh.write(b'#!' + shebang.encode() + b'\n')
    with zipfile.ZipFile(fh, 'w') as zf:
        for name in sorted(names):
            info = zipfile.ZipInfo(name, date_time)
            info.create_system = 3
            if name.endswith('/'):
                info.external_attr = (0o40755 << 16) | 0x10
                zf.writestr(info, b'')
            else:
                info.external_attr = 0o100644 << 16
                with open(os.path.join(stage, name), 'rb') as src:
                    data = src.read()
                zf.writestr(info, data, zipfile.ZIP_DEFLATED, 9)
os.chmod(out, 0o755)
endef
export PYZ_WRITER

$(PYZ): $(PYZ_SOURCES) $(VENDOR_STAMP) Makefile
	@rm -rf $(STAGE) && mkdir -p $(STAGE)
	@cp -R $(VENDOR)/. $(STAGE)/
	@cp sshlog.py $(wildcard bpf_probes.c) $(STAGE)/
	@for d in conf.d samples; do if [ -d $$d ]; then cp -R $$d $(STAGE)/; fi; done
	@printf 'import sys\n\nimport sshlog\n\nsys.exit(sshlog.main())\n' > $(STAGE)/__main__.py
	@find $(STAGE) -mindepth 1 \( -name '.*' -o -name __pycache__ -o -name '*.py[co]' \) \
	    -prune -exec rm -rf {} +
	$(PYTHON) -c "$$PYZ_WRITER" $(STAGE) $(PYTHON_SHEBANG) $(SOURCE_DATE_EPOCH) $@.tmp
	@if [ -x $(PYTHON_SHEBANG) ]; then \
	    out=$$($(if $(filter /%,$@),,./)$@.tmp version) || { rm -f $@.tmp; exit 1; }; \
	    case "$$out" in "sshlog "*) echo "self-check: $$out";; \
	        *) echo "self-check: '$@ version' printed '$$out'" >&2; rm -f $@.tmp; exit 1;; esac; \
	else echo "self-check skipped: no $(PYTHON_SHEBANG) here" >&2; fi
	@mv -f $@.tmp $@
	@sha256sum $@ 2>/dev/null || true

# ---------------------------------------------------------------------------------- deps

# Idempotent and silent when everything is there; needs root only to change something.
define DEPS_SH
set -eu
export DEBIAN_FRONTEND=noninteractive
say() { printf 'deps: %s\n' "$$*"; }
need_root() {
    if [ "$$(id -u)" != 0 ]; then say "$$1 - run as root: sudo make deps" >&2; exit 1; fi
}
installed=$$(dpkg-query -W -f='$${Package} $${db:Status-Status}\n' $(DEPS_PKGS) 2>/dev/null \
             | awk '$$2 == "installed" { print $$1 }') || true
missing=
for p in $(DEPS_PKGS); do
    case " $$(echo $$installed) " in *" $$p "*) ;; *) missing="$$missing $$p" ;; esac
done
if [ -n "$$missing" ]; then
    need_root "missing packages:$$missing"
    say "apt-get update"
    apt-get update -qq
    # Installing must start no service (rsyslog, sshd on port 22): without a policy-rc.d
    # of the image's own, put one in place for the time of the install.
    policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' > $$policy && chmod 0755 $$policy
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    say "apt-get install$$missing"
    apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends $$missing
    if [ -n "$$policy" ]; then rm -f $$policy; trap - EXIT; fi
fi
kver=$$(uname -r)
mods=/lib/modules/$$kver
if [ ! -e "$$mods/build/include" ]; then
    hdr=$$(ls -d /usr/src/linux-headers-*-$(DEB_ARCH) 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$$hdr" ] || [ ! -d "$${hdr%-$(DEB_ARCH)}-common" ]; then
        say "no kernel headers for $$kver and no /usr/src/linux-headers-*-$(DEB_ARCH) (+ -common)" >&2
        exit 1
    fi
    need_root "no kernel headers under $$mods"
    mkdir -p "$$mods"
    for l in build source; do
        if [ -d "$$mods/$$l" ] && [ ! -L "$$mods/$$l" ]; then rmdir "$$mods/$$l"; fi
    done
    ln -sfn "$$hdr" "$$mods/build"
    ln -sfn "$${hdr%-$(DEB_ARCH)}-common" "$$mods/source"
    say "linked $$mods/build -> $$hdr, $$mods/source -> $${hdr%-$(DEB_ARCH)}-common"
fi
if ! awk '$$2 == "/sys/kernel/tracing" && $$3 == "tracefs" { found = 1 } END { exit !found }' /proc/mounts; then
    need_root "tracefs is not mounted"
    mount -t tracefs tracefs /sys/kernel/tracing
    say "mounted tracefs at /sys/kernel/tracing"
fi
if [ ! -d /run/sshd ]; then
    need_root "no /run/sshd"
    install -d -m 0755 /run/sshd
    say "created /run/sshd"
fi
for py in $(PY39) $(PY311); do
    [ -x "$$py" ] || continue
    if ! "$$py" -c 'import sys; from importlib.util import find_spec as f; sys.exit(not (f("pytest") and f("hypothesis") and f("aiosmtpd")))'; then
        say "pip install pytest hypothesis aiosmtpd into $$py"
        PIP_ROOT_USER_ACTION=ignore "$$py" -m pip install -q pytest hypothesis aiosmtpd
    fi
done
endef
export DEPS_SH

deps:
	@bash -c "$$DEPS_SH"

# ---------------------------------------------------------------------------------- tests

UNIT_CMD  = $(TEST_ENV) $(PY39) -m pytest $(PYTEST_ARGS) $(UNIT_TESTS)
SUITE_CMD = SSHLOG_REQUIRE_ROOT=1 $(TEST_ENV) $(PYTEST_PY) -m pytest -ra $(PYTEST_ARGS)
UNIT_SH   = if [ -n "$(PY39)" ] && [ -x "$(PY39)" ]; then \
                echo '$(UNIT_CMD)'; $(UNIT_CMD); \
            else echo "WARNING: no Python 3.9 found (set PY39=); skipped the unit tier under 3.9" >&2; fi
# The unit tier once more under pyenv's 3.11 (no bcc there: proves the module needs none).
UNIT311_CMD = $(TEST_ENV) $(PY311) -m pytest $(PYTEST_ARGS) $(UNIT_TESTS)
UNIT311_SH  = if [ -n "$(PY311)" ] && [ -x "$(PY311)" ]; then \
                echo '$(UNIT311_CMD)'; $(UNIT311_CMD); \
            else echo "WARNING: no pyenv Python 3.11 found (set PY311=); skipped" >&2; fi

# Both tiers run even when the first fails; the exit status says whether either failed.
test: deps $(PYZ)
	@status=0; \
	$(UNIT_SH) || status=1; \
	$(UNIT311_SH) || status=1; \
	echo '$(SUITE_CMD) tests'; $(SUITE_CMD) tests || status=1; \
	exit $$status

test-unit: $(VENDOR_STAMP)
	@$(UNIT_SH)

test-root: deps $(PYZ)
	$(SUITE_CMD) $(ROOT_TESTS)

# BENCH_ARGS=--quick: ~3 minutes instead of ~10; --only report: no root needed
bench: $(PYZ)
	/usr/bin/python3 tests/bench.py $(BENCH_ARGS)

# README's "Configuration reference" is generated from the schemas (a unit test compares).
define README_REFERENCE
import sys
sys.path[:0] = [".", "$(VENDOR)"]
import sshlog
text = open("README.md").read()
begin, end = "<!-- reference:begin -->\n", "<!-- reference:end -->"
i, j = text.index(begin) + len(begin), text.index(end)
new = text[:i] + "\n" + sshlog.config_reference() + "\n" + text[j:]
if new != text:
    open("README.md", "w").write(new)
    print("README.md: configuration reference updated")
endef
export README_REFERENCE

readme:
	$(PYTHON) -c "$$README_REFERENCE"

run: deps $(PYZ)
	$(PYZ_RUN) daemon

clean:
	rm -rf $(STAGE) $(VENDOR) $(PYZ) $(PYZ).tmp .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(BUILD)
