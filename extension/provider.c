/*-------------------------------------------------------------------------
 *
 * provider.c
 *		What every worker must agree on about providers and their keys, kept
 *		in shared memory: each provider's circuit breaker and provider-wide
 *		limit, each credential's rest after a 429, auth failure and last use.
 *		Also beat.provider_state_rows and beat.credential_state_rows, which
 *		beat.provider_health reads, and beat.forget_credential_state.
 *
 * The breaker.  Closed, it lets every call through and counts consecutive
 * failures and, in a window of breaker_window, calls and failures.  It
 * opens after breaker_failures failures in a row, or when at least
 * breaker_min_calls calls in the window failed at breaker_rate or more.
 * Open, it lets nothing through for breaker_cooldown; then it is half-open
 * and lets breaker_probes calls through.  A probe that succeeds closes it;
 * one that fails opens it again.  A failure is a timeout, a connection
 * error or an answer the provider's rules call transient (5xx by default).
 *
 * A credential that gets a 429 rests for the longer of the provider's wait
 * (Retry-After, or what its rules name) and a time that doubles with each
 * 429 in a row, from rest_base up to rest_cap, with jitter.  When every key
 * of a provider got a 429 within two seconds, that is the provider's own
 * limit: the provider waits instead, and the keys are not blamed.
 *
 * The state is a cache of facts, not configuration: it starts empty (or
 * from beat.credential's durable mirror, seeded by the workers) and a
 * crash loses at most a rest or an open breaker, which the next failure
 * restores.  One LWLock guards both tables; every operation is a few
 * comparisons under it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/pg_prng.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/timestamp.h"

#include "pg_beat.h"
#include "provider.h"

PG_FUNCTION_INFO_V1(beat_provider_state_rows);
PG_FUNCTION_INFO_V1(beat_credential_state_rows);
PG_FUNCTION_INFO_V1(beat_forget_credential_state);

#define MAX_PROVIDERS		256
#define LIMITED_TOGETHER_US	(2 * USECS_PER_SEC)

typedef enum BreakerState
{
	BREAKER_CLOSED = 0,
	BREAKER_OPEN,
	BREAKER_HALF_OPEN
} BreakerState;

typedef struct ProviderEntry
{
	char		name[NAMEDATALEN];	/* hash key */
	BreakerState state;
	TimestampTz open_until;
	int			probes_used;	/* half-open: calls let through so far */
	int			probes_max;		/* from the settings of the last admit */
	TimestampTz probe_since;	/* when the first probe went out */
	int64		cooldown_us;
	int			consecutive;
	TimestampTz window_start;
	int			window_calls;
	int			window_failures;
	TimestampTz limited_until;	/* every key got 429: the provider's limit */
	int			limited_streak; /* such limits in a row, no success between */
	uint64		calls;
	uint64		failures;
	uint64		fallbacks;
	char		last_error[128];
} ProviderEntry;

typedef struct CredentialEntry
{
	int64		id;				/* hash key */
	TimestampTz rest_until;
	TimestampTz last_used;
	TimestampTz last_429;
	int			streak;
	bool		auth_failed;
} CredentialEntry;

int			beat_max_credentials = 1000;

static LWLock *provider_lock;
static HTAB *providers;
static HTAB *credentials;

Size
beat_provider_shmem_size(void)
{
	return add_size(hash_estimate_size(MAX_PROVIDERS, sizeof(ProviderEntry)),
					hash_estimate_size(beat_max_credentials, sizeof(CredentialEntry)));
}

void
beat_provider_shmem_request(void)
{
	RequestAddinShmemSpace(beat_provider_shmem_size());
	RequestNamedLWLockTranche("pg_beat providers", 1);
}

/* Called under AddinShmemInitLock. */
void
beat_provider_shmem_startup(void)
{
	HASHCTL		info;

	provider_lock = &(GetNamedLWLockTranche("pg_beat providers"))->lock;
	memset(&info, 0, sizeof(info));
	info.keysize = NAMEDATALEN;
	info.entrysize = sizeof(ProviderEntry);
	providers = ShmemInitHash("pg_beat providers", MAX_PROVIDERS, MAX_PROVIDERS,
							  &info, HASH_ELEM | HASH_STRINGS);
	memset(&info, 0, sizeof(info));
	info.keysize = sizeof(int64);
	info.entrysize = sizeof(CredentialEntry);
	credentials = ShmemInitHash("pg_beat credentials", beat_max_credentials,
								beat_max_credentials, &info, HASH_ELEM | HASH_BLOBS);
}

/* The provider's entry, made if missing (NULL when the table is full). */
static ProviderEntry *
provider_entry(const char *name, bool create)
{
	char		key[NAMEDATALEN];
	bool		found;
	ProviderEntry *e;

	memset(key, 0, sizeof(key));
	strlcpy(key, name, sizeof(key));
	e = hash_search(providers, key, create ? HASH_ENTER_NULL : HASH_FIND, &found);
	if (e != NULL && !found)
	{
		memset(((char *) e) + NAMEDATALEN, 0, sizeof(ProviderEntry) - NAMEDATALEN);
		e->state = BREAKER_CLOSED;
	}
	return e;
}

static CredentialEntry *
credential_entry(int64 id, bool create)
{
	bool		found;
	CredentialEntry *e;

	e = hash_search(credentials, &id, create ? HASH_ENTER_NULL : HASH_FIND, &found);
	if (e != NULL && !found)
		memset(((char *) e) + sizeof(int64), 0, sizeof(CredentialEntry) - sizeof(int64));
	return e;
}

bool
beat_provider_available(const char *provider, TimestampTz now, TimestampTz *until)
{
	ProviderEntry *e;
	bool		ok = true;

	*until = 0;
	LWLockAcquire(provider_lock, LW_SHARED);
	e = provider_entry(provider, false);
	if (e != NULL)
	{
		if (e->state == BREAKER_OPEN && now < e->open_until)
		{
			ok = false;
			*until = e->open_until;
		}
		else if (e->state == BREAKER_HALF_OPEN && e->probes_used >= e->probes_max &&
				 now - e->probe_since < e->cooldown_us)
		{
			/* the probes are out: their answers decide */
			ok = false;
			*until = e->probe_since + e->cooldown_us;
		}
		if (e->limited_until > now)
		{
			ok = false;
			*until = Max(*until, e->limited_until);
		}
	}
	LWLockRelease(provider_lock);
	return ok;
}

bool
beat_breaker_admit(const char *provider, const BeatBreakerConfig *c, TimestampTz now,
				   TimestampTz *until, TimestampTz *probe)
{
	ProviderEntry *e;
	bool		ok = true;

	*until = 0;
	*probe = 0;
	LWLockAcquire(provider_lock, LW_EXCLUSIVE);
	e = provider_entry(provider, true);
	if (e != NULL)
	{
		e->probes_max = c->probes;
		e->cooldown_us = c->cooldown_us;
		if (e->state == BREAKER_OPEN && now >= e->open_until)
		{
			e->state = BREAKER_HALF_OPEN;
			e->probes_used = 0;
			e->probe_since = now;
		}
		/* probes that never answered (their worker died) are forgotten */
		if (e->state == BREAKER_HALF_OPEN && e->probes_used >= c->probes &&
			now - e->probe_since >= c->cooldown_us)
		{
			e->probes_used = 0;
			e->probe_since = now;
		}
		if (e->state == BREAKER_OPEN)
		{
			ok = false;
			*until = e->open_until;
		}
		else if (e->state == BREAKER_HALF_OPEN)
		{
			if (e->probes_used < c->probes)
			{
				e->probes_used++;
				*probe = e->probe_since;
			}
			else
			{
				ok = false;
				*until = e->probe_since + c->cooldown_us;
			}
		}
		if (ok)
			e->calls++;
	}
	LWLockRelease(provider_lock);
	return ok;
}

void
beat_breaker_report(const char *provider, const BeatBreakerConfig *c, bool ok,
					const char *error, TimestampTz now)
{
	ProviderEntry *e;

	LWLockAcquire(provider_lock, LW_EXCLUSIVE);
	e = provider_entry(provider, true);
	if (e == NULL)
	{
		LWLockRelease(provider_lock);
		return;
	}
	if (now - e->window_start > c->window_us)
	{
		e->window_start = now;
		e->window_calls = 0;
		e->window_failures = 0;
	}
	e->window_calls++;
	if (ok)
	{
		e->consecutive = 0;
		if (e->state == BREAKER_HALF_OPEN)
		{
			/* the probe got through: close, and start counting afresh */
			e->state = BREAKER_CLOSED;
			e->window_start = now;
			e->window_calls = 0;
			e->window_failures = 0;
		}
	}
	else
	{
		e->failures++;
		e->consecutive++;
		e->window_failures++;
		if (error)
			strlcpy(e->last_error, error, sizeof(e->last_error));
		if (e->state == BREAKER_HALF_OPEN ||
			(e->state == BREAKER_CLOSED &&
			 (e->consecutive >= c->failures ||
			  (e->window_calls >= c->min_calls &&
			   e->window_failures >= c->rate * e->window_calls))))
		{
			e->state = BREAKER_OPEN;
			e->open_until = now + c->cooldown_us;
			e->probes_used = 0;
			ereport(LOG,
					(errmsg("pg_beat: circuit breaker of provider \"%s\" opened for %.1f s after %d failures in a row (%d of %d calls in the window)",
							provider, c->cooldown_us / 1e6, e->consecutive,
							e->window_failures, e->window_calls)));
		}
	}
	LWLockRelease(provider_lock);
}

/*
 * A rest after the streak-th 429 in a row: base doubled streak - 1 times,
 * capped at cap.  The callers add their own jitter.
 */
static int64
doubled_rest(int streak, int64 base_us, int64 cap_us)
{
	int64		ttl = base_us;

	for (int i = 1; i < streak && ttl < cap_us; i++)
		ttl *= 2;
	return Min(ttl, cap_us);
}

/*
 * The provider's own limit was hit (every key got 429, or it has no key):
 * wait the longer of its Retry-After and a rest that doubles with each such
 * limit in a row (from rest_base to rest_cap, with jitter), until a call
 * succeeds again.  Called with provider_lock held.
 */
static TimestampTz
provider_limited(ProviderEntry *p, int64 wait_us, int64 rest_base_us, int64 rest_cap_us,
				 TimestampTz now)
{
	int64		ttl;
	TimestampTz until;

	if (p == NULL)
		return now + Max(wait_us, rest_base_us);
	p->limited_streak = Min(p->limited_streak + 1, 40);
	ttl = doubled_rest(p->limited_streak, rest_base_us, rest_cap_us);
	if (p->limited_streak > 1)
		ttl = ttl / 2 + (int64) (pg_prng_double(&pg_global_prng_state) * (ttl / 2));
	until = now + Max(wait_us, Max(ttl, rest_base_us));
	p->limited_until = Max(p->limited_until, until);
	return until;
}

void
beat_provider_served(const char *provider)
{
	ProviderEntry *e;

	LWLockAcquire(provider_lock, LW_SHARED);
	e = provider_entry(provider, false);
	if (e == NULL || e->limited_streak == 0)
	{
		LWLockRelease(provider_lock);
		return;
	}
	LWLockRelease(provider_lock);
	LWLockAcquire(provider_lock, LW_EXCLUSIVE);
	e = provider_entry(provider, false);
	if (e != NULL)
		e->limited_streak = 0;
	LWLockRelease(provider_lock);
}

void
beat_breaker_release(const char *provider, TimestampTz probe)
{
	ProviderEntry *e;

	if (probe == 0)
		return;					/* it took no probe: nothing to give back */
	LWLockAcquire(provider_lock, LW_EXCLUSIVE);
	e = provider_entry(provider, false);
	if (e != NULL && e->state == BREAKER_HALF_OPEN && e->probe_since == probe &&
		e->probes_used > 0)
		e->probes_used--;
	LWLockRelease(provider_lock);
}

void
beat_provider_count_fallback(const char *provider)
{
	ProviderEntry *e;

	LWLockAcquire(provider_lock, LW_EXCLUSIVE);
	e = provider_entry(provider, true);
	if (e != NULL)
		e->fallbacks++;
	LWLockRelease(provider_lock);
}

int
beat_credentials_ready(const int64 *ids, int n, TimestampTz now, int *order,
					   TimestampTz *earliest)
{
	TimestampTz used[64];
	int			m = 0;

	*earliest = 0;
	n = Min(n, (int) lengthof(used));
	LWLockAcquire(provider_lock, LW_SHARED);
	for (int i = 0; i < n; i++)
	{
		CredentialEntry *e = credential_entry(ids[i], false);
		TimestampTz last = e ? e->last_used : 0;
		int			j;

		if (e != NULL && e->auth_failed)
			continue;
		if (e != NULL && e->rest_until > now)
		{
			if (*earliest == 0 || e->rest_until < *earliest)
				*earliest = e->rest_until;
			continue;
		}
		/* insertion sort: least recently used first */
		for (j = m; j > 0 && used[j - 1] > last; j--)
		{
			used[j] = used[j - 1];
			order[j] = order[j - 1];
		}
		used[j] = last;
		order[j] = i;
		m++;
	}
	LWLockRelease(provider_lock);
	return m;
}

void
beat_credential_used(int64 id, TimestampTz now)
{
	CredentialEntry *e;

	LWLockAcquire(provider_lock, LW_EXCLUSIVE);
	e = credential_entry(id, true);
	if (e != NULL)
		e->last_used = now;
	LWLockRelease(provider_lock);
}

void
beat_credential_ok(int64 id)
{
	CredentialEntry *e;

	LWLockAcquire(provider_lock, LW_EXCLUSIVE);
	e = credential_entry(id, false);
	if (e != NULL)
		e->streak = 0;
	LWLockRelease(provider_lock);
}

bool
beat_credential_limited(const char *provider, const int64 *ids, int n, int64 id,
						int64 wait_us, int64 rest_base_us, int64 rest_cap_us,
						TimestampTz now, TimestampTz *rest_until, int *streak)
{
	CredentialEntry *e;
	bool		together = true;
	int64		ttl;
	double		jitter = pg_prng_double(&pg_global_prng_state);

	LWLockAcquire(provider_lock, LW_EXCLUSIVE);
	e = id != 0 ? credential_entry(id, true) : NULL;
	if (e == NULL)
	{
		/* no key (or no room to remember it): the provider waits */
		*rest_until = provider_limited(provider_entry(provider, true), wait_us,
									   rest_base_us, rest_cap_us, now);
		*streak = 0;
		LWLockRelease(provider_lock);
		return true;
	}
	e->streak = Min(e->streak + 1, 40);
	e->last_429 = now;
	ttl = doubled_rest(e->streak, rest_base_us, rest_cap_us);
	ttl = ttl / 2 + (int64) (jitter * (ttl / 2));
	e->rest_until = now + Max(ttl, wait_us);
	*rest_until = e->rest_until;
	*streak = e->streak;

	/* did every usable key of the provider just get a 429? */
	for (int i = 0; i < n; i++)
	{
		CredentialEntry *o = credential_entry(ids[i], false);

		if (o != NULL && o->auth_failed)
			continue;
		if (o == NULL || o->last_429 < now - LIMITED_TOGETHER_US)
		{
			together = false;
			break;
		}
	}
	if (together)
	{
		TimestampTz until = provider_limited(provider_entry(provider, true), wait_us,
											 rest_base_us, rest_cap_us, now);

		for (int i = 0; i < n; i++)
		{
			CredentialEntry *o = credential_entry(ids[i], false);

			if (o != NULL && !o->auth_failed)
			{
				o->rest_until = 0;
				o->streak = Max(o->streak - 1, 0);
				o->last_429 = 0;
			}
		}
		*rest_until = until;
		*streak = e->streak;
	}
	LWLockRelease(provider_lock);
	return together;
}

void
beat_credential_auth_failed(int64 id)
{
	CredentialEntry *e;

	LWLockAcquire(provider_lock, LW_EXCLUSIVE);
	e = credential_entry(id, true);
	if (e != NULL)
		e->auth_failed = true;
	LWLockRelease(provider_lock);
}

void
beat_credential_get(int64 id, TimestampTz *rest_until, int *streak)
{
	CredentialEntry *e;

	LWLockAcquire(provider_lock, LW_SHARED);
	e = credential_entry(id, false);
	*rest_until = e ? e->rest_until : 0;
	*streak = e ? e->streak : 0;
	LWLockRelease(provider_lock);
}

void
beat_credential_seed(int64 id, TimestampTz rest_until, int streak)
{
	CredentialEntry *e;

	LWLockAcquire(provider_lock, LW_EXCLUSIVE);
	if (credential_entry(id, false) == NULL)
	{
		e = credential_entry(id, true);
		if (e != NULL)
		{
			e->rest_until = rest_until;
			e->streak = streak;
		}
	}
	LWLockRelease(provider_lock);
}

/* beat.forget_credential_state(id): a person re-enabled or dropped the key. */
Datum
beat_forget_credential_state(PG_FUNCTION_ARGS)
{
	int64		id = PG_GETARG_INT64(0);

	LWLockAcquire(provider_lock, LW_EXCLUSIVE);
	hash_search(credentials, &id, HASH_REMOVE, NULL);
	LWLockRelease(provider_lock);
	PG_RETURN_VOID();
}

static const char *
breaker_name(BreakerState s)
{
	return s == BREAKER_OPEN ? "open" : s == BREAKER_HALF_OPEN ? "half-open" : "closed";
}

/* beat.provider_state_rows(): every provider the workers have called. */
Datum
beat_provider_state_rows(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	HASH_SEQ_STATUS seq;
	ProviderEntry *e;
	TimestampTz now = GetCurrentTimestamp();

	InitMaterializedSRF(fcinfo, 0);
	LWLockAcquire(provider_lock, LW_SHARED);
	hash_seq_init(&seq, providers);
	while ((e = hash_seq_search(&seq)) != NULL)
	{
		Datum		values[11];
		bool		nulls[11] = {false};
		BreakerState state = e->state;

		/* an open breaker past its cool-down lets the next call probe */
		if (state == BREAKER_OPEN && now >= e->open_until)
			state = BREAKER_HALF_OPEN;
		values[0] = CStringGetTextDatum(e->name);
		values[1] = CStringGetTextDatum(breaker_name(state));
		values[2] = TimestampTzGetDatum(e->open_until);
		nulls[2] = state != BREAKER_OPEN;
		values[3] = Int32GetDatum(e->consecutive);
		values[4] = Int32GetDatum(e->window_calls);
		values[5] = Int32GetDatum(e->window_failures);
		values[6] = TimestampTzGetDatum(e->limited_until);
		nulls[6] = e->limited_until <= now;
		values[7] = Int64GetDatum((int64) e->calls);
		values[8] = Int64GetDatum((int64) e->failures);
		values[9] = Int64GetDatum((int64) e->fallbacks);
		values[10] = CStringGetTextDatum(e->last_error);
		nulls[10] = e->last_error[0] == '\0';
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	LWLockRelease(provider_lock);
	return (Datum) 0;
}

/* beat.credential_state_rows(): every key the workers have used. */
Datum
beat_credential_state_rows(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	HASH_SEQ_STATUS seq;
	CredentialEntry *e;
	TimestampTz now = GetCurrentTimestamp();

	InitMaterializedSRF(fcinfo, 0);
	LWLockAcquire(provider_lock, LW_SHARED);
	hash_seq_init(&seq, credentials);
	while ((e = hash_seq_search(&seq)) != NULL)
	{
		Datum		values[5];
		bool		nulls[5] = {false};

		values[0] = Int64GetDatum(e->id);
		values[1] = TimestampTzGetDatum(e->rest_until);
		nulls[1] = e->rest_until <= now;
		values[2] = Int32GetDatum(e->streak);
		values[3] = BoolGetDatum(e->auth_failed);
		values[4] = TimestampTzGetDatum(e->last_used);
		nulls[4] = e->last_used == 0;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	LWLockRelease(provider_lock);
	return (Datum) 0;
}
