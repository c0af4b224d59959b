/* Layout 3 of the quantized top-k (distill/corpus/codec.py, docs/corpus-format.md): an adaptive
 * range coder, LZMA's carry scheme, over each record alone (a record's bytes decode without its
 * shard or its neighbours, as layouts 1 and 2 do). codec.py calls it through ctypes; the module
 * init below only lets Python's import system find the compiled file.
 *
 * Ids. Each row first codes which slot holds the record's sampled response token (k: none;
 * 75 % of SmolLM2's rows hold it in slot 0, 99 % somewhere), which the decoder reads from
 * `response_token_ids`. Every other id is "seen earlier in this record" (one adaptive bit per
 * slot group) and then coded by its count among the record's earlier ids, the ids already in this
 * row excluded (PPM order 0 over the record, a Fenwick tree of counts), or a literal: its bit
 * length and top 4 bits adaptively, the rest as they are (BPE vocabularies number frequent tokens
 * first).
 * Codes. Per row the k codes of the logprob grid (slot 0's level, then the steps down from the
 * slot before), each an unsigned int with the model of its slot group, then the tail code as the
 * signed difference from the row's last level.
 * Layout 4 adds a dictionary, learnt from a corpus's first shard and kept in every shard's footer
 * (topk_coder.Dictionary): literals are coded by a class of ids (ids the first shard's records
 * used about equally often) and their index in it, and every model starts from the probabilities
 * it had after coding that shard. The escape class codes a literal as layout 3 does.
 * docs/results/scale.md ("Layout 3", "Layout 4") has the measurements behind the models and their
 * parameters. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* every step of the coder inlined into topk_encode and topk_decode, where `encode` is a constant */
#define INLINE static inline __attribute__((always_inline))
#define TOP (1u << 24)
#define PROB_BITS 16
#define ONE (1 << PROB_BITS)
#define RATE_LIMIT 30 /* a probability adapts at 1/(n + 1.6) for its first n updates, then 1/31.6 */
#define TOP_BITS 4
#define INT_MODEL (32 + 32 * 16) /* an int's model: bit-length tree, 16 top-bit nodes per length */
#define MAX_TOTAL (1 << 16)      /* counts halve beyond this (the coder divides its range by it) */
#define MAX_ID (1 << 24)         /* the quantized encoding's id limit (codec.py checks it) */
#define CODE_GROUPS 6
#define MODELS (INT_MODEL * 8)
#define DICTIONARY_RATE 16 /* a model started from the dictionary adapts at 1/(16 + 1.6), then as any other */

static const int ID_GROUP[] = {0, 1, 2, 2, 3, 3, 3, 3}; /* slot -> seen-bit model; later slots: 4 */
static const int CODE_GROUP[] = {1, 2, 3, 3, 4, 4, 4, 4}; /* code j -> model; later codes: 5; tail: 0 */
static const int RECIP[RATE_LIMIT + 1] = { /* 65536 / (n + 1.6) */
    40960, 25206, 18204, 14246, 11702, 9929, 8623, 7620, 6826, 6182, 5649, 5201, 4818, 4488, 4201, 3947,
    3723,  3523,  3343,  3181,  3034,  2899, 2776, 2664, 2560, 2463, 2374, 2291, 2214, 2141, 2073};

typedef struct {
    uint64_t low;
    uint32_t range, code;
    uint8_t cache;
    int64_t pending, pos, end, cap;
    uint8_t *out;
    const uint8_t *in;
    int encode;
} Coder;

typedef struct {
    uint16_t p[MODELS];
    uint8_t n[MODELS];
} Models;

/* Layout 4's dictionary (classes 0: no literal classes, layout 3's literals). `cum`: the classes'
 * cumulative frequencies, the escape last; `start`: where each class's ids (ascending) begin in
 * `ids`; `init`: each model's starting probability, ids' models then codes' (0: untouched, starts
 * at 1/2; NULL: every one at 1/2). */
typedef struct {
    int classes;
    const int32_t *ids, *start;
    const uint32_t *cum;
    const uint16_t *init;
    int32_t *key, *val; /* encode: id -> its class << 24 | its index in the class (open addressing) */
    int64_t mask;
} Dictionary;

INLINE void put(Coder *c, uint8_t b) {
    if (c->pos < c->cap) c->out[c->pos] = b;
    c->pos++;
}

INLINE void shift_low(Coder *c) {
    if (c->low < 0xFF000000ull || c->low >= (1ull << 32)) {
        uint8_t carry = (uint8_t)(c->low >> 32), byte = c->cache;
        do {
            put(c, (uint8_t)(byte + carry));
            byte = 0xFF;
        } while (--c->pending != 0);
        c->cache = (uint8_t)(c->low >> 24);
    }
    c->pending++;
    c->low = (c->low & 0x00FFFFFFull) << 8;
}

INLINE uint8_t next_byte(Coder *c) {
    int64_t i = c->pos++;
    return i < c->end ? c->in[i] : 0;
}

INLINE void normalize(Coder *c) {
    while (c->range < TOP) {
        c->range <<= 8;
        if (c->encode)
            shift_low(c);
        else
            c->code = (c->code << 8) | next_byte(c);
    }
}

INLINE void start(Coder *c, int64_t from, int64_t to) {
    c->low = 0, c->range = 0xFFFFFFFFu, c->cache = 0, c->pending = 1, c->code = 0;
    if (!c->encode) {
        c->pos = from, c->end = to;
        for (int i = 0; i < 5; i++) c->code = (c->code << 8) | next_byte(c);
    }
}

INLINE void finish(Coder *c) {
    for (int i = 0; i < 5; i++) shift_low(c);
}

INLINE int bit(Coder *c, Models *m, int i, int b) {
    uint32_t bound = (c->range >> PROB_BITS) * m->p[i];
    if (!c->encode) {
        b = c->code >= bound;
        if (b) c->code -= bound;
    }
    int p = m->p[i];
    if (!b) {
        c->range = bound;
        p += ((ONE - p) * RECIP[m->n[i]]) >> 16;
    } else {
        if (c->encode) c->low += bound;
        c->range -= bound;
        p -= (p * RECIP[m->n[i]]) >> 16;
    }
    m->p[i] = (uint16_t)(p < 64 ? 64 : p > ONE - 64 ? ONE - 64 : p);
    if (m->n[i] < RATE_LIMIT) m->n[i]++;
    normalize(c);
    return b;
}

INLINE uint32_t raw_bits(Coder *c, uint32_t v, int bits) {
    uint32_t got = 0;
    for (int b = bits - 1; b >= 0; b--) {
        c->range >>= 1;
        int x = (v >> b) & 1;
        if (c->encode) {
            if (x) c->low += c->range;
        } else {
            x = c->code >= c->range;
            if (x) c->code -= c->range;
        }
        got = (got << 1) | (uint32_t)x;
        normalize(c);
    }
    return got;
}

/* An unsigned int below 2^31 with the model at `base`: its bit length, top bits, the rest raw. */
INLINE uint32_t uint_(Coder *c, Models *m, int base, uint32_t v) {
    int length = 0;
    if (c->encode)
        while (length < 31 && (v >> length) > 0) length++;
    int node = 1;
    for (int b = 4; b >= 0; b--) node = node * 2 + bit(c, m, base + node, (length >> b) & 1);
    length = node - 32;
    if (length <= 1) return (uint32_t)length;
    int rest = length - 1, top = rest < TOP_BITS ? rest : TOP_BITS, tree = base + 32 + length * 16;
    node = 1;
    for (int b = rest - 1; b >= rest - top; b--) node = node * 2 + bit(c, m, tree + node, (v >> b) & 1);
    uint32_t low_bits = rest - top;
    return ((uint32_t)node << low_bits) | raw_bits(c, v & ((1u << low_bits) - 1), (int)low_bits);
}

INLINE void models_reset(Models *m, const uint16_t *init) {
    for (int i = 0; i < MODELS; i++) {
        int learnt = init && init[i];
        m->p[i] = learnt ? init[i] : ONE / 2, m->n[i] = learnt ? DICTIONARY_RATE : 0;
    }
}

/* A record's start: the ids' models and the codes' from the dictionary's probabilities (or 1/2). */
INLINE void record_start(Models *ids, Models *codes, const uint16_t *init) {
    models_reset(ids, init), models_reset(codes, init ? init + MODELS : NULL);
}

/* A symbol of frequency `freq` at cumulative `below` out of `total` (the decoder first reads
 * where the code lies: `at`). */
INLINE uint32_t freq_at(Coder *c, uint32_t total) {
    return c->code / (c->range / total);
}

INLINE void freq_code(Coder *c, uint32_t below, uint32_t freq, uint32_t total) {
    uint32_t unit = c->range / total;
    if (c->encode) c->low += (uint64_t)below * unit; else c->code -= below * unit;
    c->range = freq * unit;
    normalize(c);
}

/* --- ids: a record's distinct ids in a hash map (id -> index), their counts in a Fenwick tree --- */
typedef struct {
    int32_t *key, *val; /* open addressing, key -1: empty */
    int64_t mask;
    int32_t *tree, *count, *id_of;
    uint8_t *in_row;
    int32_t *row_ids; /* per slot of the row being coded: its id's index, or -1 */
    int64_t size;     /* the tree's length: a power of two above the record's distinct ids */
} Record;

/* open addressing over int32 keys (-1: empty) */
INLINE int32_t map_get(const int32_t *key, const int32_t *val, int64_t mask, int32_t id) {
    int64_t h = ((uint64_t)(uint32_t)id * 0x9E3779B1u) & mask;
    while (key[h] != -1) {
        if (key[h] == id) return val[h];
        h = (h + 1) & mask;
    }
    return -1;
}

INLINE void map_put(int32_t *key, int32_t *val, int64_t mask, int32_t id, int32_t v) {
    int64_t h = ((uint64_t)(uint32_t)id * 0x9E3779B1u) & mask;
    while (key[h] != -1) h = (h + 1) & mask;
    key[h] = id, val[h] = v;
}

INLINE int32_t local_of(Record *r, int32_t id) {
    return map_get(r->key, r->val, r->mask, id);
}

INLINE void add_local(Record *r, int32_t id, int32_t li) {
    map_put(r->key, r->val, r->mask, id, li);
}

INLINE void fenwick_add(Record *r, int64_t i, int32_t d) {
    for (i++; i < r->size; i += i & (-i)) r->tree[i] += d;
}

INLINE int64_t fenwick_below(Record *r, int64_t i) {
    int64_t s = 0;
    for (; i > 0; i -= i & (-i)) s += r->tree[i];
    return s;
}

INLINE int64_t fenwick_find(Record *r, int64_t target) {
    int64_t pos = 0, step = r->size / 2;
    for (; step > 0; step /= 2)
        if (pos + step < r->size && r->tree[pos + step] <= target) pos += step, target -= r->tree[pos];
    return pos;
}

static int record_alloc(Record *r, int64_t entries, int k) {
    int64_t cap = 64, size = 2;
    while (cap < 2 * entries) cap *= 2;
    while (size <= entries) size *= 2;
    r->mask = cap - 1, r->size = size;
    r->key = malloc(cap * sizeof(int32_t)), r->val = malloc(cap * sizeof(int32_t));
    r->tree = calloc(size, sizeof(int32_t)), r->count = calloc(size, sizeof(int32_t));
    r->id_of = calloc(size, sizeof(int32_t)), r->in_row = calloc(size, 1), r->row_ids = calloc(k, sizeof(int32_t));
    if (!r->key || !r->val || !r->tree || !r->count || !r->id_of || !r->in_row || !r->row_ids) return -1;
    memset(r->key, 0xFF, cap * sizeof(int32_t));
    return 0;
}

static void record_free(Record *r) {
    free(r->key), free(r->val), free(r->tree), free(r->count), free(r->id_of), free(r->in_row), free(r->row_ids);
}

/* The encoder's map from a dictionary id to its class and index. */
static int dictionary_index(Dictionary *d) {
    int64_t n = d->classes ? d->start[d->classes] : 0, cap = 64;
    while (cap < 2 * n) cap *= 2;
    d->mask = cap - 1;
    d->key = malloc(cap * sizeof(int32_t)), d->val = malloc(cap * sizeof(int32_t));
    if (!d->key || !d->val) return -1;
    memset(d->key, 0xFF, cap * sizeof(int32_t));
    for (int cls = 0; cls < d->classes; cls++)
        for (int32_t i = d->start[cls]; i < d->start[cls + 1]; i++)
            map_put(d->key, d->val, d->mask, d->ids[i], cls << 24 | (i - d->start[cls]));
    return 0;
}

/* A literal id (one new to its record): its class and index in the dictionary, or the escape
 * class and then its bit length, top 4 bits adaptively and the rest as they are (BPE
 * vocabularies number frequent tokens first). Returns the id, or -1 if the bytes are not one. */
INLINE int64_t literal(Coder *c, Models *m, const Dictionary *d, int32_t id) {
    int cls = d->classes;
    if (d->classes) {
        uint32_t total = d->cum[d->classes + 1];
        int32_t at = c->encode ? map_get(d->key, d->val, d->mask, id) : -1;
        if (c->encode) {
            cls = at >= 0 ? at >> 24 : d->classes;
        } else {
            uint32_t where = freq_at(c, total);
            if (where >= total) return -1;
            for (cls = 0; d->cum[cls + 1] <= where;) cls++;
        }
        freq_code(c, d->cum[cls], d->cum[cls + 1] - d->cum[cls], total);
        if (cls < d->classes) {
            uint32_t size = (uint32_t)(d->start[cls + 1] - d->start[cls]), index = at & 0xFFFFFF;
            if (!c->encode && (size == 0 || (index = freq_at(c, size)) >= size)) return -1;
            freq_code(c, index, 1, size);
            return d->ids[d->start[cls] + index];
        }
    }
    uint32_t v = uint_(c, m, 0, c->encode ? (uint32_t)id : 0);
    return v < MAX_ID ? (int64_t)v : -1;
}

/* One record's ids [rows, k] (encode: given; decode: filled). Returns 0, or -1 if the bytes are
 * not a record's ids (decode only). */
INLINE int code_record_ids(Coder *c, Models *m, Record *r, const Dictionary *d, int32_t *ids, const int64_t *response,
                           int64_t rows, int k) {
    int64_t distinct = 0, total = 0;
    int32_t *row_ids = r->row_ids;
    const int sampled_model = INT_MODEL, seen_model = 2 * INT_MODEL;
    for (int64_t t = 0; t < rows; t++) {
        int32_t *row = ids + t * k;
        int64_t removed = 0;
        int sampled = k;
        if (c->encode)
            for (int j = 0; j < k; j++)
                if (row[j] == response[t]) {
                    sampled = j;
                    break;
                }
        sampled = (int)uint_(c, m, sampled_model, (uint32_t)sampled);
        if (sampled > k || (sampled < k && (response[t] < 0 || response[t] >= MAX_ID))) return -1;
        for (int step = 0; step <= k; step++) {
            /* the sampled slot first (its id is known), then the others in slot order */
            int j = step == 0 ? sampled : step - 1;
            if (j == k || (step > 0 && j == sampled)) continue;
            int32_t s, li;
            int64_t left = total - removed;
            if (j == sampled) {
                s = (int32_t)response[t];
                li = local_of(r, s);
            } else {
                int group = j < 8 ? ID_GROUP[j] : 4;
                int seen = 0;
                if (c->encode) {
                    s = row[j];
                    li = local_of(r, s);
                    seen = li >= 0 && !r->in_row[li];
                    if (left > 0) bit(c, m, seen_model + group, !seen);
                } else {
                    seen = left > 0 && bit(c, m, seen_model + group, 0) == 0;
                }
                if (seen) {
                    uint32_t unit = c->range / (uint32_t)left;
                    if (!c->encode) {
                        int64_t at = c->code / unit;
                        li = (int32_t)fenwick_find(r, at < left ? at : left - 1);
                        if (li >= distinct || r->in_row[li] || r->count[li] == 0) return -1;
                        s = r->id_of[li];
                    }
                    uint32_t below = (uint32_t)fenwick_below(r, li) * unit;
                    if (c->encode) c->low += below; else c->code -= below;
                    c->range = (uint32_t)r->count[li] * unit;
                    normalize(c);
                } else {
                    int64_t v = literal(c, m, d, s);
                    if (!c->encode) {
                        if (v < 0) return -1;
                        s = (int32_t)v;
                        li = local_of(r, s);
                    }
                }
            }
            if (!c->encode) row[j] = s;
            if (li < 0) {
                if (distinct + 1 >= r->size) return -1;
                li = (int32_t)distinct++;
                add_local(r, s, li);
                r->id_of[li] = s, r->count[li] = 0;
            }
            row_ids[j] = -1;
            if (!r->in_row[li]) {
                r->in_row[li] = 1, row_ids[j] = li;
                if (r->count[li] > 0) fenwick_add(r, li, -r->count[li]), removed += r->count[li];
            }
        }
        for (int j = 0; j < k; j++) {
            int32_t li = row_ids[j];
            if (li < 0) continue;
            r->count[li]++, total++;
            fenwick_add(r, li, r->count[li]);
            r->in_row[li] = 0;
        }
        if (total + k >= MAX_TOTAL) {
            memset(r->tree, 0, r->size * sizeof(int32_t));
            total = 0;
            for (int64_t i = 0; i < distinct; i++) {
                r->count[i] = (r->count[i] + 1) >> 1, total += r->count[i];
                fenwick_add(r, i, r->count[i]);
            }
        }
    }
    /* clear what this record used, for the next one */
    memset(r->key, 0xFF, (r->mask + 1) * sizeof(int32_t));
    memset(r->tree, 0, r->size * sizeof(int32_t));
    return 0;
}

/* The grid (codec.py's `_grid_codes`): slot 0 on the fine grid; slot j's step is the fine one
 * doubled once for every `grid[1]` fine steps by which slot j-1 lies below `grid[0]` of them, at
 * most `grid[2]` times. */
INLINE int doublings(const int64_t *grid, int64_t level) {
    int64_t d = level > grid[0] ? (level - grid[0]) / grid[1] : 0;
    return (int)(d < grid[2] ? d : grid[2]);
}

/* One record's codes [rows, k + 1]: per row the tail code, then the k grid codes. */
INLINE int code_record_codes(Coder *c, Models *m, int64_t *codes, int64_t rows, int k, const int64_t *grid,
                             int64_t code_max) {
    for (int64_t t = 0; t < rows; t++) {
        int64_t *row = codes + t * (k + 1), level = 0;
        for (int j = 1; j <= k; j++) {
            int group = j <= 8 ? CODE_GROUP[j - 1] : CODE_GROUPS - 1;
            row[j] = uint_(c, m, INT_MODEL * group, (uint32_t)row[j]);
            if (row[j] > code_max) return -1;
            level += row[j] << (j == 1 ? 0 : doublings(grid, level));  /* in fine steps */
        }
        int64_t d = row[0] - level;
        uint32_t z = uint_(c, m, 0, (uint32_t)(d >= 0 ? 2 * d : -2 * d - 1)); /* zigzag */
        row[0] = level + (z % 2 == 0 ? (int64_t)(z / 2) : -(int64_t)(z + 1) / 2);
        if (row[0] < 0 || row[0] > code_max) return -1;
    }
    return 0;
}

static int64_t largest(const int64_t *tokens, int64_t records) {
    int64_t most = 1;
    for (int64_t i = 0; i < records; i++)
        if (tokens[i] > most) most = tokens[i];
    return most;
}

/* The dictionary of the arguments (classes 0: no literal classes; init NULL: none). */
static Dictionary dictionary(int classes, const int32_t *ids, const int32_t *start, const uint32_t *cum,
                             const uint16_t *init) {
    Dictionary d = {.classes = classes, .ids = ids, .start = start, .cum = cum, .init = init};
    return d;
}

static void dictionary_free(Dictionary *d) {
    free(d->key), free(d->val);
}

/* Encode `records` records of tokens[i] rows each: ids [n, k] (int32), the sampled response
 * tokens [n], codes [n, k + 1] (int64: tail, then the k grid codes), with the dictionary
 * (`classes` 0: none). Writes each record's bytes after the last into id_out / code_out and their
 * ends into id_ends / code_ends (relative to the buffers). `learnt` (or NULL): the models carry
 * over from record to record instead, and their final probabilities go there (0: untouched; the
 * ids' models, then the codes'), for a dictionary. Returns 0, or -1 when a buffer is too small
 * (the ends then say how much was needed), -2 when out of memory. */
int64_t topk_encode(int64_t records, const int64_t *tokens, int k, const int32_t *ids, const int64_t *response,
                    int64_t *codes, const int64_t *grid, int classes, const int32_t *dict_ids, const int32_t *dict_start,
                    const uint32_t *dict_cum, const uint16_t *dict_init, uint16_t *learnt, uint8_t *id_out,
                    int64_t id_cap, int64_t *id_ends, uint8_t *code_out, int64_t code_cap, int64_t *code_ends) {
    Record r = {0};
    Dictionary d = dictionary(classes, dict_ids, dict_start, dict_cum, dict_init);
    Models *mi = malloc(sizeof(Models)), *mc = malloc(sizeof(Models));
    if (!mi || !mc || record_alloc(&r, largest(tokens, records) * k, k) || dictionary_index(&d)) {
        free(mi), free(mc), record_free(&r), dictionary_free(&d);
        return -2;
    }
    Coder ci = {.out = id_out, .cap = id_cap, .encode = 1}, cc = {.out = code_out, .cap = code_cap, .encode = 1};
    int64_t row = 0;
    for (int64_t i = 0; i < records; i++) {
        if (!learnt || i == 0) record_start(mi, mc, d.init);
        start(&ci, 0, 0);
        code_record_ids(&ci, mi, &r, &d, (int32_t *)ids + row * k, response + row, tokens[i], k);
        finish(&ci);
        id_ends[i] = ci.pos;
        start(&cc, 0, 0);
        code_record_codes(&cc, mc, codes + row * (k + 1), tokens[i], k, grid, INT64_MAX);
        finish(&cc);
        code_ends[i] = cc.pos;
        row += tokens[i];
    }
    for (int i = 0; learnt && i < MODELS; i++) {
        learnt[i] = mi->n[i] ? mi->p[i] : 0;
        learnt[MODELS + i] = mc->n[i] ? mc->p[i] : 0;
    }
    record_free(&r), dictionary_free(&d);
    free(mi), free(mc);
    return ci.pos > id_cap || cc.pos > code_cap ? -1 : 0;
}

/* The inverse: fills ids [n, k] and codes [n, k + 1] from each record's byte ranges. Returns -1,
 * or the index of the first record whose bytes do not decode (-2: out of memory). A record's
 * decoder reads exactly its bytes (5 at the start and one per byte the encoder shifted out, which
 * with its 5 flushing shifts is what it wrote), so a string cut short or grown is refused. */
int64_t topk_decode(int64_t records, const int64_t *tokens, int k, const uint8_t *id_data, const int64_t *id_starts,
                    const int64_t *id_ends, const uint8_t *code_data, const int64_t *code_starts,
                    const int64_t *code_ends, const int64_t *response, const int64_t *grid, int64_t code_max,
                    int classes, const int32_t *dict_ids, const int32_t *dict_start, const uint32_t *dict_cum,
                    const uint16_t *dict_init, int32_t *ids, int64_t *codes) {
    Record r = {0};
    Dictionary d = dictionary(classes, dict_ids, dict_start, dict_cum, dict_init);
    Models *mi = malloc(sizeof(Models)), *mc = malloc(sizeof(Models));
    if (!mi || !mc || record_alloc(&r, largest(tokens, records) * k, k)) {
        free(mi), free(mc), record_free(&r);
        return -2;
    }
    Coder ci = {.in = id_data, .encode = 0}, cc = {.in = code_data, .encode = 0};
    int64_t row = 0, bad = -1;
    for (int64_t i = 0; i < records && bad < 0; i++) {
        record_start(mi, mc, d.init);
        start(&ci, id_starts[i], id_ends[i]);
        if (code_record_ids(&ci, mi, &r, &d, ids + row * k, response + row, tokens[i], k) || ci.pos != ci.end)
            bad = i;
        start(&cc, code_starts[i], code_ends[i]);
        if (code_record_codes(&cc, mc, codes + row * (k + 1), tokens[i], k, grid, code_max) || cc.pos != cc.end)
            bad = i;
        row += tokens[i];
    }
    record_free(&r);
    free(mi), free(mc);
    return bad;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_topk_coder", "Layout 3's range coder (ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__topk_coder(void) {
    return PyModule_Create(&module);
}
