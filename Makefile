# nmoe build. `make` builds build/nmoe (CPU only); `make CUDA=1` builds
# build/cuda/nmoe with the CUDA backend (sm_90a). `make test` runs the whole CPU suite; `make run` installs what
# is missing, prepares sample data and trains configs/tiny.toml.
#
# Sources are found by directory: a new .c file under src/ (or .cu under
# src/backend/cuda with CUDA=1) joins the build with no edit here. Each
# tests/unit/test_*.c is one cmocka binary linked against build/libnmoe.a;
# tests/unit/test_*_f64.c link the CPU backend built in double precision.

CC      ?= gcc
NVCC    ?= /usr/local/cuda/bin/nvcc
CUDA    ?= 0
# The CUDA build lives in its own tree so switching flavours never mixes objects:
# build/nmoe (CPU only) and build/cuda/nmoe (CPU + CUDA backends).
ifeq ($(CUDA),1)
BUILD   := build/cuda
else
BUILD   := build
endif
CFLAGS  := -std=c11 -O2 -g -fopenmp -Wall -Wextra -Wno-unused-parameter -Werror=implicit-function-declaration \
           -D_GNU_SOURCE -Isrc $(EXTRA_CFLAGS)
LDLIBS  := -fopenmp -lm -lpthread -lcrypto -lsqlite3 -lpcre2-8 -lutf8proc -lzstd

ALL_C   := $(sort $(wildcard src/*/*.c src/*/*/*.c))
MAIN_C  := src/main.c
LIB_C   := $(filter-out $(MAIN_C),$(ALL_C))
CPU_BE_C := $(wildcard src/backend/cpu/*.c)
LIB_O   := $(LIB_C:%.c=$(BUILD)/%.o)
F64_O   := $(filter-out $(CPU_BE_C:%.c=$(BUILD)/%.o),$(LIB_O)) $(CPU_BE_C:%.c=$(BUILD)/f64/%.o)

ifeq ($(CUDA),1)
CUDA_HOME ?= /usr/local/cuda
CU_SRC  := $(sort $(wildcard src/backend/cuda/*.cu))
CU_O    := $(CU_SRC:%.cu=$(BUILD)/%.o)
NVFLAGS := -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Isrc -lineinfo \
           -Xcompiler -fPIC,-Wall -Wno-deprecated-gpu-targets $(EXTRA_NVFLAGS)
CFLAGS  += -DNMOE_CUDA -I$(CUDA_HOME)/include
LDLIBS  += -L$(CUDA_HOME)/lib64 -lcudart -lcublasLt -lcublas -lnccl -lstdc++ -Wl,-rpath,$(CUDA_HOME)/lib64
LIB_O   += $(CU_O)
F64_O   += $(CU_O)
endif

TEST_SRC := $(sort $(wildcard tests/unit/test_*.c))
GPU_TEST_SRC := $(sort $(wildcard tests/gpu/*.c))
GPU_TEST_BIN := $(GPU_TEST_SRC:tests/gpu/%.c=$(BUILD)/gpu/%)
TEST_BIN := $(TEST_SRC:tests/unit/%.c=$(BUILD)/tests/%)

.PHONY: all test run clean setup gputests
all: $(BUILD)/nmoe

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/f64/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -DNMOE_REAL_DOUBLE -MMD -MP -c $< -o $@

$(BUILD)/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/libnmoe.a: $(LIB_O)
	@rm -f $@; ar rcs $@ $^

$(BUILD)/libnmoe_f64.a: $(F64_O)
	@rm -f $@; ar rcs $@ $^

$(BUILD)/nmoe: $(BUILD)/src/main.o $(BUILD)/libnmoe.a
	$(CC) -o $@ $^ $(LDLIBS)

$(BUILD)/tests/%_f64: tests/unit/%_f64.c $(BUILD)/libnmoe_f64.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -DNMOE_REAL_DOUBLE -Itests/unit -o $@ $^ $(LDLIBS) -lcmocka

$(BUILD)/tests/%: tests/unit/%.c $(BUILD)/libnmoe.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests/unit -o $@ $^ $(LDLIBS) -lcmocka

# GPU checks (run on the GPU machine): plain C programs, no cmocka there.
gputests: $(GPU_TEST_BIN)
$(BUILD)/gpu/%: tests/gpu/%.c $(BUILD)/libnmoe.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests/gpu -o $@ $^ $(LDLIBS)

setup:
	@bash scripts/setup.sh

# The whole CPU suite: unit binaries then end-to-end shell tests; one summary line.
test: setup
	@$(MAKE) --no-print-directory all $(TEST_BIN) $(BUILD)/gpu/model_dump
	@bash tests/run_all.sh $(TEST_BIN)

run: setup all
	@bash scripts/run_demo.sh

clean:
	rm -rf $(BUILD)

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
