/*-------------------------------------------------------------------------
 *
 * provider.h
 *		Shared state of providers and credentials (provider.c): circuit
 *		breakers, provider-wide limits and credentials resting after a 429.
 *
 *-------------------------------------------------------------------------
 */
#ifndef BEAT_PROVIDER_H
#define BEAT_PROVIDER_H

#include "datatype/timestamp.h"

/* A provider's circuit breaker settings, from beat.provider. */
typedef struct BeatBreakerConfig
{
	int			failures;		/* consecutive failures that open it */
	double		rate;			/* or this failure rate ... */
	int			min_calls;		/* ... over at least this many calls in the window */
	int64		window_us;
	int64		cooldown_us;	/* open this long, then half-open */
	int			probes;			/* calls let through while half-open */
} BeatBreakerConfig;

extern int	beat_max_credentials;

extern Size beat_provider_shmem_size(void);
extern void beat_provider_shmem_request(void);
extern void beat_provider_shmem_startup(void);

/* May provider be called now?  If not, *until says when it may (0: unknown). */
extern bool beat_provider_available(const char *provider, TimestampTz now,
									TimestampTz *until);

/*
 * Count a call through the breaker; false if it is open (or out of probes).
 * *probe: the half-open round whose probe the call took, or 0 (none).
 */
extern bool beat_breaker_admit(const char *provider, const BeatBreakerConfig *c,
							   TimestampTz now, TimestampTz *until, TimestampTz *probe);

/* Report how an admitted call ended: a success closes, failures may open. */
extern void beat_breaker_report(const char *provider, const BeatBreakerConfig *c,
								bool ok, const char *error, TimestampTz now);

/*
 * An admitted call that took probe (beat_breaker_admit's *probe) was never
 * made (its request could not be built, its host was refused, or its worker
 * stopped): the half-open breaker gets that probe back at once instead of
 * after the cool-down.  Nothing if the round has ended since.
 */
extern void beat_breaker_release(const char *provider, TimestampTz probe);

/* A call of provider succeeded: its own limit's back-off starts over. */
extern void beat_provider_served(const char *provider);

/* A transfer moved on from provider to the next in its chain. */
extern void beat_provider_count_fallback(const char *provider);

/*
 * The credentials among ids (n of them) that may be used now, as indexes
 * into ids, least recently used first; returns how many.  *earliest is set
 * to when the first resting one is back (0: none is resting).
 */
extern int	beat_credentials_ready(const int64 *ids, int n, TimestampTz now,
								   int *order, TimestampTz *earliest);

/* Note a use of credential id now. */
extern void beat_credential_used(int64 id, TimestampTz now);

/* A success or an ordinary failure: the key's 429 streak ends. */
extern void beat_credential_ok(int64 id);

/*
 * Credential id (one of provider's ids) got a 429 and should wait at least
 * wait_us.  It rests for the longer of that and a time that doubles with
 * each 429 in a row (rest_base_us up to rest_cap_us, with jitter).  If
 * every key of the provider got a 429 within the last two seconds, the
 * provider is limited instead (returns true) and the keys are not blamed.
 * *rest_until is when the key (or the provider) may be called again.
 * id 0 is a call made without a key: the provider's own limit.
 */
extern bool beat_credential_limited(const char *provider, const int64 *ids, int n,
									int64 id, int64 wait_us, int64 rest_base_us,
									int64 rest_cap_us, TimestampTz now,
									TimestampTz *rest_until, int *streak);

/* An auth failure: the key is out until beat.enable_credential. */
extern void beat_credential_auth_failed(int64 id);

/* The key's shared state, for the durable mirror in beat.credential. */
extern void beat_credential_get(int64 id, TimestampTz *rest_until, int *streak);

/* Seed a key's shared state from beat.credential, if it has none yet. */
extern void beat_credential_seed(int64 id, TimestampTz rest_until, int streak);

#endif							/* BEAT_PROVIDER_H */
