/*-------------------------------------------------------------------------
 *
 * limiter.h
 *		The shared-memory rate limiter (limiter.c), for SQL and the workers.
 *
 *-------------------------------------------------------------------------
 */
#ifndef BEAT_LIMITER_H
#define BEAT_LIMITER_H

#include "utils/guc.h"

#define BEAT_KEY_MAX			128	/* a key, with its NUL */
#define BEAT_MAX_STACKED_KEYS	16

typedef enum BeatLimiterMode
{
	BEAT_CHARGE,				/* admit and charge, all keys or none */
	BEAT_PEEK,					/* only say what a charge would do */
	BEAT_REFUND					/* give a charge back */
} BeatLimiterMode;

/* The answer for a set of keys. */
typedef struct BeatAcquireResult
{
	bool		allowed;
	int64		retry_us;		/* refused: a wait after which it is admitted */
	int64		remaining;		/* least units any key admits right after */
	int64		reset_us;		/* until every key is whole again */
	const char *blocking_key;	/* refused: the key that refused longest */
} BeatAcquireResult;

extern int	beat_limiter_max_keys;
extern char *beat_limiter_clock;

extern Size beat_limiter_shmem_size(void);
extern void beat_limiter_shmem_request(void);
extern void beat_limiter_shmem_startup(void);
extern void beat_limiter_init(void);
extern bool beat_limiter_clock_check(char **newval, void **extra, GucSource source);
extern void beat_limiter_clock_assign(const char *newval, void *extra);
extern void beat_limiter_refresh(void);
extern void beat_limiter_save(void);
extern BeatAcquireResult beat_limiter_apply(const char *const *keys, int nkeys,
											int64 cost, BeatLimiterMode mode);
extern BeatAcquireResult beat_limiter_try(const char *const *keys, int nkeys,
										  int64 cost, BeatLimiterMode mode, char **error);

#endif							/* BEAT_LIMITER_H */
