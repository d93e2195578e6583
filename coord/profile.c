#include "profile.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

fasa_profile *fasa_profile_new(int n_layers, int n_heads, int n_kv_heads, int head_dim, int ntip)
{
    fasa_profile *p = calloc(1, sizeof(*p));
    if (!p) return NULL;
    p->n_layers = n_layers;
    p->n_heads = n_heads;
    p->n_kv_heads = n_kv_heads;
    p->head_dim = head_dim;
    p->ntip = ntip;
    const size_t lh = (size_t)n_layers * n_heads;
    p->fcs = calloc(lh * (ntip > 0 ? ntip : 1), sizeof(int));
    p->ca = calloc(lh * (head_dim / 2 > 0 ? head_dim / 2 : 1), sizeof(double));
    if (!p->fcs || !p->ca) fasa_profile_destroy(&p);
    return p;
}

void fasa_profile_destroy(fasa_profile **profile_p)
{
    fasa_profile *p = profile_p ? *profile_p : NULL;
    if (!p) return;
    free(p->fcs);
    free(p->ca);
    free(p);
    *profile_p = NULL;
}

fasa_profile *fasa_profile_clone(const fasa_profile *src)
{
    fasa_profile *p =
        fasa_profile_new(src->n_layers, src->n_heads, src->n_kv_heads, src->head_dim, src->ntip);
    if (!p) return NULL;
    int *fcs = p->fcs;
    double *ca = p->ca;
    *p = *src;
    p->fcs = fcs;
    p->ca = ca;
    const size_t lh = (size_t)src->n_layers * src->n_heads;
    memcpy(p->fcs, src->fcs, lh * src->ntip * sizeof(int));
    memcpy(p->ca, src->ca, lh * (src->head_dim / 2) * sizeof(double));
    return p;
}

int fasa_profile_write(const fasa_profile *p, FILE *f)
{
    fprintf(f, "fasa-profile 1\nn_layers %d\nn_heads %d\nn_kv_heads %d\nhead_dim %d\n", p->n_layers,
            p->n_heads, p->n_kv_heads, p->head_dim);
    fprintf(f, "pairing %s\ngqa %s\nntip %d\nwindow %d\nsamples %s\n", fc_pairing_name(p->pairing),
            p->gqa_shared ? "shared" : "per-head", p->ntip, p->window,
            p->samples[0] ? p->samples : "-");
    fprintf(f, "# layer head : dominant FCs : mean CA of FC 0 .. %d\n", p->head_dim / 2 - 1);
    const int n_fc = p->head_dim / 2;
    for (int l = 0; l < p->n_layers; l++)
        for (int h = 0; h < p->n_heads; h++) {
            const size_t lh = (size_t)l * p->n_heads + h;
            fprintf(f, "%d %d :", l, h);
            for (int i = 0; i < p->ntip; i++) fprintf(f, " %d", p->fcs[lh * p->ntip + i]);
            fprintf(f, " :");
            for (int i = 0; i < n_fc; i++) fprintf(f, " %.6f", p->ca[lh * n_fc + i]);
            fprintf(f, "\n");
        }
    return ferror(f) ? -1 : 0;
}

int fasa_profile_save(const fasa_profile *p, const char *path, char *err, size_t err_len)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        snprintf(err, err_len, "cannot write profile %s: %s", path, strerror(errno));
        return -1;
    }
    int rc = fasa_profile_write(p, f);
    if (fclose(f) != 0) rc = -1;
    if (rc) snprintf(err, err_len, "cannot write profile %s: %s", path, strerror(errno));
    return rc;
}

/* Next non-comment line into buf; 0 at end of file. */
static int s_line(FILE *f, char *buf, size_t len, int *lineno)
{
    while (fgets(buf, (int)len, f)) {
        (*lineno)++;
        if (buf[0] != '#' && buf[0] != '\n') return 1;
    }
    return 0;
}

static int s_header_int(FILE *f, const char *key, int lo, int hi, int *out, int *lineno, char *err,
                        size_t err_len)
{
    char buf[256], name[64];
    if (!s_line(f, buf, sizeof(buf), lineno) || sscanf(buf, "%63s %d", name, out) != 2 ||
        strcmp(name, key) != 0) {
        snprintf(err, err_len, "line %d: expected '%s N'", *lineno, key);
        return -1;
    }
    if (*out < lo || *out > hi) {
        snprintf(err, err_len, "line %d: %s %d out of range [%d, %d]", *lineno, key, *out, lo, hi);
        return -1;
    }
    return 0;
}

static int s_header_word(FILE *f, const char *key, char *out, int *lineno, char *err,
                         size_t err_len)
{
    char buf[256], name[64];
    if (!s_line(f, buf, sizeof(buf), lineno) || sscanf(buf, "%63s %63s", name, out) != 2 ||
        strcmp(name, key) != 0) {
        snprintf(err, err_len, "line %d: expected '%s WORD'", *lineno, key);
        return -1;
    }
    return 0;
}

fasa_profile *fasa_profile_load(const char *path, char *err, size_t err_len)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, err_len, "cannot open profile %s: %s", path, strerror(errno));
        return NULL;
    }
    fasa_profile *p = fasa_profile_read(f, path, SIZE_MAX, err, err_len);
    fclose(f);
    return p;
}

fasa_profile *fasa_profile_read(FILE *f, const char *name, size_t max_cells, char *err,
                                size_t err_len)
{
    char e[200] = "", word[64];
    fasa_profile *p = NULL;
    int lineno = 0, version, nl, nh, nkv, hd, ntip, window;
    char *line = NULL;
    if (s_header_int(f, "fasa-profile", 1, 1, &version, &lineno, e, sizeof(e)) ||
        s_header_int(f, "n_layers", 1, 4096, &nl, &lineno, e, sizeof(e)) ||
        s_header_int(f, "n_heads", 1, 4096, &nh, &lineno, e, sizeof(e)) ||
        s_header_int(f, "n_kv_heads", 1, nh, &nkv, &lineno, e, sizeof(e)) ||
        s_header_int(f, "head_dim", 2, 4096, &hd, &lineno, e, sizeof(e)))
        goto fail;
    if (nh % nkv || hd % 2) {
        snprintf(e, sizeof(e), "n_heads must be a multiple of n_kv_heads and head_dim even");
        goto fail;
    }
    fc_pairing pairing;
    if (s_header_word(f, "pairing", word, &lineno, e, sizeof(e))) goto fail;
    if (fc_pairing_parse(word, &pairing)) {
        snprintf(e, sizeof(e), "line %d: pairing '%s' is not interleaved or half", lineno, word);
        goto fail;
    }
    if (s_header_word(f, "gqa", word, &lineno, e, sizeof(e))) goto fail;
    if (strcmp(word, "per-head") && strcmp(word, "shared")) {
        snprintf(e, sizeof(e), "line %d: gqa '%s' is not per-head or shared", lineno, word);
        goto fail;
    }
    const int shared = strcmp(word, "shared") == 0;
    if (s_header_int(f, "ntip", 1, hd / 2, &ntip, &lineno, e, sizeof(e)) ||
        s_header_int(f, "window", 1, 1 << 30, &window, &lineno, e, sizeof(e)))
        goto fail;
    if ((size_t)nl * nh * (size_t)(ntip + hd / 2) > max_cells) {
        snprintf(e, sizeof(e), "its geometry needs more rows than the text holds");
        goto fail;
    }
    p = fasa_profile_new(nl, nh, nkv, hd, ntip);
    if (!p) {
        snprintf(e, sizeof(e), "out of memory");
        goto fail;
    }
    p->pairing = pairing;
    p->gqa_shared = shared;
    p->window = window;
    if (s_header_word(f, "samples", p->samples, &lineno, e, sizeof(e))) goto fail;
    const int n_fc = hd / 2;
    const size_t line_len = 64 + (size_t)(ntip + n_fc) * 32;
    line = malloc(line_len);
    if (!line) goto fail;
    for (int l = 0; l < nl; l++)
        for (int h = 0; h < nh; h++) {
            if (!s_line(f, line, line_len, &lineno)) {
                snprintf(e, sizeof(e), "line %d: missing the row of layer %d head %d", lineno + 1,
                         l, h);
                goto fail;
            }
            char *s = line, *end;
            const long ll = strtol(s, &end, 10), hh = strtol(end, &s, 10);
            if (end == line || ll != l || hh != h) {
                snprintf(e, sizeof(e), "line %d: expected the row of layer %d head %d", lineno, l,
                         h);
                goto fail;
            }
            const size_t lh = (size_t)l * nh + h;
            while (*s == ' ') s++;
            if (*s++ != ':') goto bad_row;
            for (int i = 0; i < ntip; i++) {
                const long fc = strtol(s, &end, 10);
                if (end == s || fc < 0 || fc >= n_fc || (i > 0 && fc <= p->fcs[lh * ntip + i - 1]))
                    goto bad_row;
                p->fcs[lh * ntip + i] = (int)fc;
                s = end;
            }
            while (*s == ' ') s++;
            if (*s++ != ':') goto bad_row;
            for (int i = 0; i < n_fc; i++) {
                const double v = strtod(s, &end);
                if (end == s || !(v >= 0.0 && v <= 1.0)) goto bad_row;
                p->ca[lh * n_fc + i] = v;
                s = end;
            }
        }
    free(line);
    return p;
bad_row:
    snprintf(e, sizeof(e),
             "line %d: a row is 'layer head : %d ascending FCs in [0,%d) : %d CA values in [0,1]'",
             lineno, ntip, n_fc, n_fc);
fail:
    snprintf(err, err_len, "profile %s: %s", name, e);
    free(line);
    fasa_profile_destroy(&p);
    return NULL;
}

int fasa_profile_check(const fasa_profile *p, int n_layers, int n_heads, int n_kv_heads,
                       int head_dim, fc_pairing pairing, char *err, size_t err_len)
{
    const char *field = NULL;
    int want = 0, have = 0;
    if (p->n_layers != n_layers)
        field = "n_layers", want = n_layers, have = p->n_layers;
    else if (p->n_heads != n_heads)
        field = "n_heads", want = n_heads, have = p->n_heads;
    else if (p->n_kv_heads != n_kv_heads)
        field = "n_kv_heads", want = n_kv_heads, have = p->n_kv_heads;
    else if (p->head_dim != head_dim)
        field = "head_dim", want = head_dim, have = p->head_dim;
    if (field) {
        snprintf(err, err_len, "profile does not match: %s is %d in the profile, %d here", field,
                 have, want);
        return -1;
    }
    if (p->pairing != pairing) {
        snprintf(err, err_len, "profile does not match: pairing is %s in the profile, %s here",
                 fc_pairing_name(p->pairing), fc_pairing_name(pairing));
        return -1;
    }
    return 0;
}
