/*-------------------------------------------------------------------------
 *
 * http.h
 *		Request building and response handling for the flow workers.
 *
 * Nothing here calls into PostgreSQL's error machinery: these functions
 * run between curl callbacks and report failures as malloc'd messages, so
 * an error never unwinds through libcurl.  Everything they return is
 * malloc'd and freed by the caller.
 *
 *-------------------------------------------------------------------------
 */
#ifndef BEAT_HTTP_H
#define BEAT_HTTP_H

#include <stdbool.h>
#include <stddef.h>

#include <curl/curl.h>
#include <jansson.h>

/* A flow's request template, parsed once per flow change. */
typedef struct BeatTemplate
{
	char	   *method;			/* GET, POST, ... */
	char	   *url;			/* with {{param}} placeholders */
	json_t	   *query;			/* object or NULL */
	json_t	   *headers;		/* object or NULL */
	json_t	   *body;			/* any JSON or NULL */
} BeatTemplate;

/* One request, ready for curl. */
typedef struct BeatRequest
{
	char	   *url;			/* full URL with the query */
	char	   *url_logged;		/* the same with secret query values hidden */
	char		method[8];		/* a copy: the template may be reloaded meanwhile */
	struct curl_slist *headers;
	char	   *body;			/* NULL for none */
	size_t		body_len;
} BeatRequest;

/* How a transfer ended, for beat.task and beat.http_log. */
typedef enum BeatOutcome
{
	BEAT_OUTCOME_OK,
	BEAT_OUTCOME_RETRY,
	BEAT_OUTCOME_PERMANENT
} BeatOutcome;

/* A set of [lo, hi) status ranges, from an int4multirange. */
typedef struct BeatStatusSet
{
	int			n;
	int			lo[16];
	int			hi[16];
} BeatStatusSet;

/* request.c */
extern BeatTemplate *beat_template_parse(const char *json_text, char **error);
extern void beat_template_free(BeatTemplate *t);
extern bool beat_request_build(const BeatTemplate *t, const char *params_text,
							   const char *redact, json_t *secret, BeatRequest *req,
							   char **error);
extern void beat_request_free(BeatRequest *req);
extern char *beat_redact_url(const char *url, const char *redact);
extern bool beat_render_keys(char *const *templates, int n, const char *params_text,
							 const char *provider, const char *credential,
							 char **out, char **error);

/*
 * A new empty JSON object.  Never call jansson's json_object() by name from
 * pg_beat: the server executable exports a function of the same name (the
 * SQL function json_object), and the dynamic linker binds our call to it.
 */
extern json_t *beat_json_new_object(void);

/* response.c */
extern bool beat_status_in(const BeatStatusSet *set, long status);
extern BeatOutcome beat_classify_curl(CURLcode code);
extern char *beat_result_json(long status, json_t *headers, const char *body,
							  size_t len, double total_ms, bool verbatim_if_text);
extern bool beat_header_kept(const char *name, size_t len);

#endif							/* BEAT_HTTP_H */
