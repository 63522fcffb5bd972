# pg_beat — PGXS build.  The version comes from pg_beat.control only.

EXTENSION   = pg_beat
EXTVERSION  = $(shell sed -n "s/^default_version *= *'\(.*\)'/\1/p" $(EXTENSION).control)
MODULE_big  = pg_beat
OBJS        = $(patsubst %.c,%.o,$(wildcard extension/*.c bgworker/*.c))
DATA        = $(wildcard sql/$(EXTENSION)--*.sql)
PG_CPPFLAGS = -I$(CURDIR)/extension -DPG_BEAT_VERSION=\"$(EXTVERSION)\"
SHLIB_LINK  = -lcurl -ljansson
EXTRA_CLEAN = regress/results regress/output_iso regress/tmp_check regress/log demo/listen

# `make installcheck` runs the same pg_regress and isolation suites as
# `make test`, against a running server that preloads pg_beat.
REGRESS        = $(sort $(basename $(notdir $(wildcard regress/sql/*.sql))))
REGRESS_OPTS   = --inputdir=regress
ISOLATION      = $(sort $(basename $(notdir $(wildcard regress/specs/*.spec))))
ISOLATION_OPTS = --inputdir=regress

PG_CONFIG  ?= pg_config
PGXS       := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# Every object depends on the shared header.
$(OBJS): extension/pg_beat.h

# demo/listen: a LISTEN beat_events client (libpq) that counts what it got;
# the demo and the TAP tests use it.
all: demo/listen
demo/listen: demo/listen.c
	$(CC) $(CFLAGS) -I$(shell $(PG_CONFIG) --includedir) $< \
		-L$(shell $(PG_CONFIG) --libdir) -lpq -o $@

.PHONY: test
# Installs what is missing, builds with -Werror, runs every suite.
test:
	regress/run-tests

.PHONY: demo
# Installs what is missing, builds, and runs the main job end to end on a
# throwaway cluster with the local stand-in providers (demo/run).
demo:
	demo/run
