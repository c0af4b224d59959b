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
 * docs/results/scale.md ("Layout 3") has the measurements behind the models and their parameters. */
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
    uint16_t p[INT_MODEL * 8];
    uint8_t n[INT_MODEL * 8];
} Models;

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

INLINE void models_reset(Models *m) {
    for (size_t i = 0; i < sizeof(m->p) / sizeof(m->p[0]); i++) m->p[i] = ONE / 2, m->n[i] = 0;
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

INLINE int32_t local_of(Record *r, int32_t id) {
    int64_t h = ((uint64_t)(uint32_t)id * 0x9E3779B1u) & r->mask;
    while (r->key[h] != -1) {
        if (r->key[h] == id) return r->val[h];
        h = (h + 1) & r->mask;
    }
    return -1;
}

INLINE void add_local(Record *r, int32_t id, int32_t li) {
    int64_t h = ((uint64_t)(uint32_t)id * 0x9E3779B1u) & r->mask;
    while (r->key[h] != -1) h = (h + 1) & r->mask;
    r->key[h] = id, r->val[h] = li;
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

/* One record's ids [rows, k] (encode: given; decode: filled). Returns 0, or -1 if the bytes are
 * not a record's ids (decode only). */
INLINE int code_record_ids(Coder *c, Models *m, Record *r, int32_t *ids, const int64_t *response, int64_t rows,
                           int k) {
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
                    uint32_t v = uint_(c, m, 0, c->encode ? (uint32_t)s : 0);
                    if (!c->encode) {
                        if (v >= MAX_ID) return -1;
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

/* Encode `records` records of tokens[i] rows each: ids [n, k] (int32), the sampled response
 * tokens [n], codes [n, k + 1] (int64: tail, then the k grid codes). Writes each record's bytes
 * after the last into id_out / code_out and their ends into id_ends / code_ends (relative to the
 * buffers). Returns 0, or -1 when a buffer is too small (the ends then say how much was needed),
 * -2 when out of memory. */
int64_t topk_encode(int64_t records, const int64_t *tokens, int k, const int32_t *ids, const int64_t *response,
                    int64_t *codes, const int64_t *grid, uint8_t *id_out, int64_t id_cap, int64_t *id_ends, uint8_t *code_out,
                    int64_t code_cap, int64_t *code_ends) {
    Record r = {0};
    Models *m = malloc(sizeof(Models));
    if (!m || record_alloc(&r, largest(tokens, records) * k, k)) {
        free(m), record_free(&r);
        return -2;
    }
    Coder ci = {.out = id_out, .cap = id_cap, .encode = 1}, cc = {.out = code_out, .cap = code_cap, .encode = 1};
    int64_t row = 0;
    for (int64_t i = 0; i < records; i++) {
        models_reset(m);
        start(&ci, 0, 0);
        code_record_ids(&ci, m, &r, (int32_t *)ids + row * k, response + row, tokens[i], k);
        finish(&ci);
        id_ends[i] = ci.pos;
        models_reset(m);
        start(&cc, 0, 0);
        code_record_codes(&cc, m, codes + row * (k + 1), tokens[i], k, grid, INT64_MAX);
        finish(&cc);
        code_ends[i] = cc.pos;
        row += tokens[i];
    }
    record_free(&r);
    free(m);
    return ci.pos > id_cap || cc.pos > code_cap ? -1 : 0;
}

/* The inverse: fills ids [n, k] and codes [n, k + 1] from each record's byte ranges. Returns -1,
 * or the index of the first record whose bytes do not decode (-2: out of memory). A record's
 * decoder reads exactly its bytes (5 at the start and one per byte the encoder shifted out, which
 * with its 5 flushing shifts is what it wrote), so a string cut short or grown is refused. */
int64_t topk_decode(int64_t records, const int64_t *tokens, int k, const uint8_t *id_data, const int64_t *id_starts,
                    const int64_t *id_ends, const uint8_t *code_data, const int64_t *code_starts,
                    const int64_t *code_ends, const int64_t *response, const int64_t *grid, int64_t code_max, int32_t *ids,
                    int64_t *codes) {
    Record r = {0};
    Models *m = malloc(sizeof(Models));
    if (!m || record_alloc(&r, largest(tokens, records) * k, k)) {
        free(m), record_free(&r);
        return -2;
    }
    Coder ci = {.in = id_data, .encode = 0}, cc = {.in = code_data, .encode = 0};
    int64_t row = 0, bad = -1;
    for (int64_t i = 0; i < records && bad < 0; i++) {
        models_reset(m);
        start(&ci, id_starts[i], id_ends[i]);
        if (code_record_ids(&ci, m, &r, ids + row * k, response + row, tokens[i], k) || ci.pos != ci.end)
            bad = i;
        models_reset(m);
        start(&cc, code_starts[i], code_ends[i]);
        if (code_record_codes(&cc, m, codes + row * (k + 1), tokens[i], k, grid, code_max) || cc.pos != cc.end)
            bad = i;
        row += tokens[i];
    }
    record_free(&r);
    free(m);
    return bad;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_topk_coder", "Layout 3's range coder (ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__topk_coder(void) {
    return PyModule_Create(&module);
}
