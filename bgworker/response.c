/*-------------------------------------------------------------------------
 *
 * response.c
 *		Judge a finished transfer and write the task's result.
 *
 * A response's status is ok or retry when it lies in the flow's
 * ok_statuses or retry_statuses, and permanent otherwise.  A transfer that
 * got no response is a retry when the cause may pass (DNS, connect,
 * timeout, reset, a broken TLS handshake) and permanent when it will not
 * (a redirect loop, a protocol we refuse, a body over the size limit).
 *
 * The result is {"status", "headers", "body", "ms"}.  A body that is valid
 * JSON is embedded as the bytes that came, so jsonb keeps its numbers
 * exactly as the provider wrote them; other text becomes a JSON string; a
 * body that is not UTF-8 text (or holds NUL) goes in "body_base64".  The
 * caller first asks for the body embedded as it came (verbatim) and lets
 * jsonb_in judge it, asking again for the string form only when jsonb_in
 * refuses: a JSON body is parsed once, not twice.
 *
 * Plain C and malloc only: see http.h.
 *
 *-------------------------------------------------------------------------
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "http.h"

/* A new empty JSON object (see http.h for why not json_object()). */
json_t *
beat_json_new_object(void)
{
	return json_loads("{}", 0, NULL);
}

/* Is status in one of the set's [lo, hi) ranges? */
bool
beat_status_in(const BeatStatusSet *set, long status)
{
	for (int i = 0; i < set->n; i++)
		if (status >= set->lo[i] && status < set->hi[i])
			return true;
	return false;
}

/* Transient or permanent, for a transfer that got no response. */
BeatOutcome
beat_classify_curl(CURLcode code)
{
	switch (code)
	{
		case CURLE_COULDNT_RESOLVE_PROXY:
		case CURLE_COULDNT_RESOLVE_HOST:
		case CURLE_COULDNT_CONNECT:
		case CURLE_OPERATION_TIMEDOUT:
		case CURLE_SEND_ERROR:
		case CURLE_RECV_ERROR:
		case CURLE_GOT_NOTHING:
		case CURLE_PARTIAL_FILE:
		case CURLE_SSL_CONNECT_ERROR:
		case CURLE_HTTP2:
		case CURLE_HTTP2_STREAM:
		case CURLE_AGAIN:
			return BEAT_OUTCOME_RETRY;
		default:
			return BEAT_OUTCOME_PERMANENT;
	}
}

/* Response headers worth keeping in the result (name of len bytes). */
bool
beat_header_kept(const char *name, size_t len)
{
	static const char *const kept[] = {
		"content-type", "retry-after", "link", "etag", "last-modified",
		"location", NULL
	};

	for (int i = 0; kept[i]; i++)
		if (strlen(kept[i]) == len && strncasecmp(kept[i], name, len) == 0)
			return true;
	return len > 12 && strncasecmp(name, "x-ratelimit-", 12) == 0;
}

/* Is s (len bytes) valid UTF-8 with no NUL? */
static bool
utf8_text(const unsigned char *s, size_t len)
{
	size_t		i = 0;

	while (i < len)
	{
		unsigned char c = s[i];
		int			n;

		if (c == 0)
			return false;
		if (c < 0x80)
		{
			i++;
			continue;
		}
		if ((c & 0xE0) == 0xC0 && c >= 0xC2)
			n = 1;
		else if ((c & 0xF0) == 0xE0)
			n = 2;
		else if ((c & 0xF8) == 0xF0 && c <= 0xF4)
			n = 3;
		else
			return false;
		if (i + n >= len)
			return false;
		for (int k = 1; k <= n; k++)
			if ((s[i + k] & 0xC0) != 0x80)
				return false;
		i += n + 1;
	}
	return true;
}

/* Base64 of len bytes (malloc'd). */
static char *
base64(const unsigned char *s, size_t len)
{
	static const char tbl[] =
		"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	char	   *out = malloc(((len + 2) / 3) * 4 + 1);
	char	   *p = out;

	if (out == NULL)
		return NULL;
	for (size_t i = 0; i < len; i += 3)
	{
		unsigned	v = s[i] << 16;

		if (i + 1 < len)
			v |= s[i + 1] << 8;
		if (i + 2 < len)
			v |= s[i + 2];
		*p++ = tbl[(v >> 18) & 63];
		*p++ = tbl[(v >> 12) & 63];
		*p++ = i + 1 < len ? tbl[(v >> 6) & 63] : '=';
		*p++ = i + 2 < len ? tbl[v & 63] : '=';
	}
	*p = '\0';
	return out;
}

/* The result JSON text of a response (malloc'd), or NULL when out of memory. */
char *
beat_result_json(long status, json_t *headers, const char *body, size_t len,
				 double total_ms, bool verbatim_if_text)
{
	char	   *head;
	char	   *hdrs = headers ? json_dumps(headers, JSON_COMPACT) : strdup("{}");
	char	   *tail = NULL;
	char	   *out;
	size_t		headlen;
	size_t		taillen;
	bool		verbatim = false;

	if (hdrs == NULL)
		return NULL;
	if (verbatim_if_text && len > 0 && utf8_text((const unsigned char *) body, len))
		verbatim = true;

	if (asprintf(&head, "{\"status\":%ld,\"ms\":%.3f,\"headers\":%s,\"body\":",
				 status, total_ms, hdrs) < 0)
	{
		free(hdrs);
		return NULL;
	}
	free(hdrs);

	if (verbatim)
		tail = NULL;
	else if (len == 0)
		tail = strdup("null");
	else if (utf8_text((const unsigned char *) body, len))
	{
		json_t	   *str = json_stringn(body, len);

		tail = str ? json_dumps(str, JSON_ENCODE_ANY) : NULL;
		json_decref(str);
	}
	else
	{
		char	   *b64 = base64((const unsigned char *) body, len);

		if (b64 && asprintf(&tail, "null,\"body_base64\":\"%s\"", b64) < 0)
			tail = NULL;
		free(b64);
	}
	if (!verbatim && tail == NULL)
	{
		free(head);
		return NULL;
	}

	headlen = strlen(head);
	taillen = verbatim ? len : strlen(tail);
	out = malloc(headlen + taillen + 2);
	if (out != NULL)
	{
		memcpy(out, head, headlen);
		memcpy(out + headlen, verbatim ? body : tail, taillen);
		out[headlen + taillen] = '}';
		out[headlen + taillen + 1] = '\0';
	}
	free(head);
	free(tail);
	return out;
}
